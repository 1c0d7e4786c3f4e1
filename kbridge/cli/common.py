"""What several commands do with their option values, without typer: the fast path (kbridge.cli.fast) runs them too."""

from __future__ import annotations

from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.targets import parse_target
from kbridge.workload import Workload


def guest_arch(arch: str | None, target: str | None) -> Arch:
    """--arch, else the arch of the --target machine (a Vagrant machine says what it is), else the host's."""
    if arch is not None or parse_target(target).kind == "qemu":
        return get_arch(arch)
    from kbridge.targets import acquire

    with acquire(None, target=target) as guest:
        return guest.arch


def handlers(pre: bool = False, post: bool = False, entry: bool = False, ret: bool = False) -> set[str]:
    """The handler set from the four handler flags."""
    return {h for h, on in (("pre", pre), ("post", post), ("entry", entry), ("ret", ret)) if on}


def workload(run: str | None) -> Workload | None:
    """The user's --run command as a guest workload (None: the symbol's default)."""
    if run is None:
        return None
    if not run.strip():
        raise KbridgeError("empty --run command", "e.g. --run 'echo hi > /tmp/x'")
    return Workload.shell(run)


def explain_removed(jprobe: bool) -> None:
    """jprobes no longer exist: say what replaced them instead of failing obscurely."""
    if jprobe:
        raise KbridgeError(
            "jprobes were removed in Linux 4.15 (commit 590c84593045); they mirrored the probed "
            "function's signature to read its arguments",
            "use --arg NAME=N to fetch the Nth argument from the registers at entry "
            "(e.g. --pre --arg fd=1), or --entry with a kretprobe",
        )


def explain_fault_removed(krel_version: tuple[int, int] | None = None) -> KbridgeError:
    """What --fault says on kernels without kprobe fault_handler (5.14+)."""
    on = f" (this kernel is {krel_version[0]}.{krel_version[1]})" if krel_version else ""
    return KbridgeError(
        f"kprobe fault_handler was removed in Linux 5.14 (commit ec6aba3d2be1){on}: no in-tree user "
        "handled faults in it; handlers that touch memory use the *_nofault accessors instead",
        "use --kernel 5.10 to see the fault handler fire on a kernel that still has it",
    )
