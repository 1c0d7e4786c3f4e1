"""kprobe_events fetch arguments the tests write, for the guest's arch."""

from __future__ import annotations

from kbridge.arch import Arch


def arg(arch: Arch, n: int) -> str:
    """A function's Nth argument at its entry: `$argN`, or where the kernel has none (32-bit arm: no
    HAVE_FUNCTION_ARG_ACCESS_API) the register or stack slot its calling convention passes it in."""
    if arch.arg_access_api:
        return f"$arg{n}"
    regs = arch.arg_registers
    return f"%{regs[n - 1]}" if n <= len(regs) else f"$stack{n - 1 - len(regs)}"
