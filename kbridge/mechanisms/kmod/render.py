"""Render a ProbeSpec into a kernel module: C source and Kbuild from the templates in kmod/."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.mechanisms import templates
from kbridge.spec import ProbeSpec


@dataclass(frozen=True)
class ModuleSource:
    """A rendered module: its name and the files kbuild needs."""

    name: str
    files: dict[str, str]  # file name -> text

    @property
    def source(self) -> str:
        return self.files[f"{self.name}.c"]

    def digest(self) -> str:
        h = hashlib.sha256()
        for fname in sorted(self.files):
            h.update(fname.encode() + b"\0" + self.files[fname].encode() + b"\0")
        return h.hexdigest()


def name_for(kind: str, symbol: str, key: object) -> str:
    """The one naming rule of generated modules: kb_[KIND_]<symbol>_<hash of KEY>.

    Readable in lsmod, unique per KEY, within MODULE_NAME_LEN (56); KIND tells kbridge's
    modules apart ("" for probes, "insp" for inspect).
    """
    stem = re.sub(r"[^A-Za-z0-9_]", "_", symbol)[: 36 - len(kind)]
    prefix = f"kb_{kind}_" if kind else "kb_"
    return f"{prefix}{stem}_{hashlib.sha256(repr(key).encode()).hexdigest()[:8]}"


def module_name(spec: ProbeSpec) -> str:
    """The probe module for SPEC: kb_<symbol>_<hash of the spec>."""
    return name_for(
        "",
        spec.symbol,
        (spec.symbol, sorted(spec.handlers), spec.offset, spec.args, spec.maxactive, spec.comm, spec.fault),
    )


FAULT_HANDLER_REMOVED = (5, 14)  # commit ec6aba3d2be1 "kprobes: Remove kprobe::fault_handler"


def kernel_version(krel: str) -> tuple[int, int]:
    """(major, minor) of a kernel release such as 6.1.0-56-amd64."""
    m = re.match(r"(\d+)\.(\d+)", krel)
    if not m:
        raise KbridgeError(f"cannot read a kernel version from {krel!r}")
    return int(m[1]), int(m[2])


def fault_handler_removed(krel: str) -> KbridgeError:
    """The error for --fault on a kernel without kprobe fault_handler."""
    return KbridgeError(
        f"--fault: kprobe fault_handler was removed in Linux 5.14 (commit ec6aba3d2be1), and this "
        f"kernel is {krel}; it was called when a handler faulted (with the trap number), and no "
        "in-tree user needed it",
        "on 5.14+ a handler reads memory with copy_from_user_nofault()/copy_from_kernel_nofault(), "
        "whose exception-table fixup handles the fault (kbridge's handlers do); to see it fire, "
        "run on a 5.10 kernel (--kernel 5.10)",
    )


def render(spec: ProbeSpec, arch: Arch, krel: str | None = None) -> ModuleSource:
    """The C source and Kbuild for SPEC on ARCH (SPEC's symbol must already be resolved).

    KREL, the target kernel's release when known, lets --fault fail here with
    an explanation on 5.14+; the generated C refuses it too (#error).
    """
    if arch.is_syscall_wrapper(spec.symbol) and any(a.index > 6 for a in spec.args):
        raise KbridgeError(f"{spec.symbol} is a syscall: it has at most 6 arguments")
    if spec.fault and krel is not None and kernel_version(krel) >= FAULT_HANDLER_REMOVED:
        raise fault_handler_removed(krel)
    env = templates.environment()
    name = module_name(spec)
    ctx = {
        "module": name,
        "symbol": spec.symbol,
        "offset": spec.offset,
        "handlers": [h for h in ("pre", "post", "entry", "ret") if h in spec.handlers],
        "kprobe": spec.kprobe,
        "kretprobe": spec.kretprobe,
        "args": spec.args,
        "maxactive": spec.maxactive,
        "comm": spec.comm,
        "syscall_wrapper": arch.is_syscall_wrapper(spec.symbol),
        "arch": arch.name,
        "fault": spec.fault,
        # The registers a handler reports (x86_64: ip, flags; arm64: pc, pstate; arm: pc, cpsr).
        "ipreg": arch.ip_register,
        "flagsreg": arch.flags_register,
        "regs_flags": arch.regs_flags,
        "insn_after_trap": arch.insn_after_trap,
        "insn_facts": arch.insn_facts,
        # Where each argument is at the function's entry: regs_get_kernel_argument(), or on
        # 32-bit arm (no HAVE_FUNCTION_ARG_ACCESS_API) r0-r3 and then the stack.
        "arg_access_api": arch.arg_access_api,
        "arg_registers": len(arch.c_arg_fields),
        "arg_exprs": [arch.c_arg(a.index - 1) for a in spec.args],
    }
    return ModuleSource(
        name,
        {
            f"{name}.c": env.get_template("probe.c.j2").render(ctx),
            "Kbuild": env.get_template("Kbuild.j2").render(ctx),
        },
    )
