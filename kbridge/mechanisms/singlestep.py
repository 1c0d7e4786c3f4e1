"""The single-step, seen in the hits: a pre-handler's ip/pc and the post-handler's that follows it.

x86_64: the pre-handler runs from int3 (or its ftrace emulation) with ip = addr + 1;
the post-handler runs after the probed instruction was stepped, with ip = addr + its
length. arm64: pc = addr in the pre-handler (BRK does not advance it), addr + 4 after.
32-bit arm: pc = addr in the pre-handler (the undefined instruction leaves it there), and
no single-step at all: the trap handler simulates or emulates the instruction
(arch/arm/probes), so the post-handler sees addr + 4, or a branch's target.
"""

from __future__ import annotations

from dataclasses import dataclass

from kbridge.arch import Arch, get_arch
from kbridge.spec import Hit


def insn_run(arch: Arch, mode: str, facts: dict[str, str]) -> str:
    """How the probed instruction runs while a probe armed in MODE is live.

    From the live kprobe's decoded instruction where the arch table lists its facts (32-bit
    arm: the handler decode-arm.c chose, whether it uses an instruction slot, whether an
    optimized probe runs the instruction itself); otherwise from the arch's one way.
    """
    if mode == "ftrace":
        return "not at all: the ftrace call site is a nop, skipped (no trap, no single-step)"
    handler = facts.get("handler", "").split("+", 1)[0]
    if mode == "optimized":
        if not facts or facts.get("direct_exec") == "1":
            return "copied into the detour buffer and run there (no trap)"
        # arm: an instruction that reads pc cannot run elsewhere; optimized_callback() calls its handler.
        return f"simulated by {handler}, called from the detour buffer (it reads pc, so it cannot run there)"
    if mode != "breakpoint":
        return "-"
    if not handler:
        return arch.insn_after_trap
    if facts.get("slot") == "1":
        return f"emulated by {handler} from an instruction slot, in the trap handler (no single-step)"
    return f"simulated by {handler} in C, in the trap handler (no slot, no single-step)"


def expected_ips(arch: Arch, mode: str) -> tuple[int, tuple[int, int]]:
    """(pre ip - addr, (min, max) of post ip - addr) for a probe armed in MODE (kprobes/list) on ARCH.

    A breakpoint reports the ip after it (x86 int3: +1) or at it (arm64 BRK: +0), then the
    probed instruction is single-stepped: the post ip is past it. In ftrace mode nothing traps
    and nothing is stepped: kprobe_ftrace_handler() sets ip as a trap would, then moves it past
    the ftrace call site (MCOUNT_INSN_SIZE) for the post-handler.
    """
    if mode == "ftrace":
        return arch.pre_ip_offset, (arch.ftrace_site_len, arch.ftrace_site_len)
    return arch.pre_ip_offset, arch.insn_lengths


@dataclass(frozen=True)
class SingleStep:
    """One pre/post pair on one thread."""

    pre: Hit
    post: Hit

    @property
    def length(self) -> int | None:
        """Bytes of the instruction stepped between the handlers (post ip - probe address)."""
        if self.post.ip is None or self.post.addr is None:
            return None
        return self.post.ip - self.post.addr

    def text(self) -> str:
        """What happened between the two handlers, in the mode the kernel armed the probe."""
        name = self.pre.ip_name
        assert self.pre.ip is not None and self.post.ip is not None and self.pre.addr is not None
        arch = get_arch(self.pre.arch)
        moved = f"{name} {self.pre.ip:#x} -> {self.post.ip:#x}"
        pre = self.pre.ip - self.pre.addr
        if self.pre.mode == "ftrace":
            return (
                f"ftrace, no trap and no single-step: {moved} (kprobe_ftrace_handler sets {name} = probe "
                f"{pre:+d} as a trap would, then moves it past the {self.length}-byte ftrace call site "
                "before the post-handler)"
            )
        if self.pre.mode == "optimized":
            return f"optimized, a jump to a detour buffer (no trap): {moved}"
        trap = (
            f"probe {pre:+d}, after the {arch.breakpoint_name}"
            if pre
            else f"probe +0: the {arch.breakpoint_name} leaves {name} at the probe"
        )
        lo, hi = arch.insn_lengths
        if self.length is not None and lo <= self.length <= hi:
            post = f"the original {self.length}-byte instruction was {arch.insn_after_trap}"
        else:  # a branch (b, bl, pop {pc}...): simulated, so pc is where it went
            post = f"the original instruction, a branch, was {arch.insn_after_trap}: {name} is its target"
        step = "single-step" if arch.single_steps else "no single-step"
        return f"{step}: {moved} (pre: {trap}; post: {post})"


class StepPairer:
    """Feed hits in order; returns the SingleStep a post hit completes, if any."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], Hit] = {}

    def feed(self, hit: Hit) -> SingleStep | None:
        if hit.ip is None:
            return None
        key = (hit.mechanism, hit.tid if hit.tid is not None else hit.pid)
        if hit.handler == "pre":
            self._open[key] = hit
        elif hit.handler == "post" and (pre := self._open.pop(key, None)) is not None and pre.addr == hit.addr:
            return SingleStep(pre, hit)
        return None
