"""Options shared by kbridge commands, declared once so every command spells and explains them alike."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.targets import parse_target
from kbridge.workload import Workload

GUEST = "Guest"
HISTORY = "Kernel history (features that were removed, and what replaced them)"

ArchOpt = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        help="Guest architecture: x86_64, arm64 or arm (32-bit, armhf) (default: the host's).",
        rich_help_panel=GUEST,
    ),
]
KernelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--kernel",
        help="Guest kernel: bullseye|5.10, bookworm|6.1 (default), trixie|6.12, sid|latest.",
        rich_help_panel=GUEST,
    ),
]
TargetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--target",
        help="qemu (the embedded VM, default) or vagrant[:MACHINE] (a machine of ./Vagrantfile).",
        rich_help_panel=GUEST,
    ),
]
MirrorOpt = Annotated[
    Optional[str],
    typer.Option(
        "--mirror",
        help="Debian mirror URL for building images (default: the host's apt sources).",
        rich_help_panel=GUEST,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON Lines on stdout: one object per hit, then a summary.")]
JsonDocOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of the table.")]

PreOpt = Annotated[bool, typer.Option("--pre", help="kprobe pre-handler (runs before the probed instruction).")]
PostOpt = Annotated[bool, typer.Option("--post", help="kprobe post-handler (runs after single-stepping it).")]
EntryOpt = Annotated[bool, typer.Option("--entry", help="kretprobe entry handler.")]
RetOpt = Annotated[bool, typer.Option("--ret", help="kretprobe return handler (with the return value).")]
ArgOpt = Annotated[
    Optional[list[str]], typer.Option("--arg", help="NAME=N: report the Nth (1-based) argument as NAME (repeatable).")
]
OffsetOpt = Annotated[int, typer.Option("--offset", help="Probe at SYMBOL+OFFSET (kprobe only).")]
MaxactiveOpt = Annotated[int, typer.Option("--maxactive", help="kretprobe instances (0: the kernel's default).")]
PidOpt = Annotated[Optional[int], typer.Option("--pid", help="Only count this guest process (all its threads).")]
TidOpt = Annotated[Optional[int], typer.Option("--tid", help="Only count this guest thread.")]
CommOpt = Annotated[Optional[str], typer.Option("--comm", help="Only count tasks with this comm (e.g. dd).")]
RunOpt = Annotated[Optional[str], typer.Option("--run", help="Guest shell command to run while armed.")]
CountOpt = Annotated[Optional[int], typer.Option("--count", help="Stop streaming after N hits.")]
DurationOpt = Annotated[Optional[float], typer.Option("--duration", help="Stop after S seconds.")]
ViaOpt = Annotated[str, typer.Option("--via", help="Mechanism: kmod (a generated module), tracefs or bpf.")]

JprobeOpt = Annotated[
    bool,
    typer.Option(
        "--jprobe",
        rich_help_panel=HISTORY,
        help="jprobes (removed in 4.15): explains what replaces them (--arg, kretprobe --entry).",
    ),
]
FaultOpt = Annotated[
    bool,
    typer.Option(
        "--fault",
        "--fault-handler",
        rich_help_panel=HISTORY,
        help="kprobe fault_handler (removed in 5.14): a handler of its own on kernels that still have it "
        "(--kernel 5.10); elsewhere explains what replaced it.",
    ),
]


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
