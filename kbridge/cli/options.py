"""Options shared by kbridge commands, declared once so every command spells and explains them alike."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from kbridge.cli.common import (
    arch_or_machine,
    chosen,
    explain_fault_removed,
    explain_removed,
    guest_arch,
    handlers,
    spec_of,
    use_vagrantfile,
    with_options,
    workload,
)

__all__ = [
    "arch_or_machine",
    "chosen",
    "explain_fault_removed",
    "explain_removed",
    "guest_arch",
    "handlers",
    "spec_of",
    "use_vagrantfile",
    "with_options",
    "workload",
]

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
        help="Guest kernel: bullseye|5.10, bookworm|6.1 (default), trixie|6.12, sid|latest, or debug "
        "(6.1 with KASAN, KFENCE, lockdep, UBSAN and DWARF, built by kbridge).",
        rich_help_panel=GUEST,
    ),
]
KernelTreeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--kernel-tree",
        help="Boot the kernel you built in this directory (vmlinux, .config, Module.symvers) instead of --kernel.",
        rich_help_panel=GUEST,
        show_default=False,
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
VagrantfileOpt = Annotated[
    Optional[str],
    typer.Option(
        "--vagrantfile",
        metavar="DIR",
        help="With --target vagrant: the directory of the Vagrantfile (default: VAGRANT_CWD, else the current one).",
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


# Option groups several commands take, declared once: with_options() (kbridge.cli.common) puts them in a
# command's signature where its **opts stands, and typer reads them from there like any other parameter.
SPEC_OPTIONS: dict[str, tuple[Any, Any]] = {
    "pre": (PreOpt, False),
    "post": (PostOpt, False),
    "entry": (EntryOpt, False),
    "ret": (RetOpt, False),
    "arg": (ArgOpt, None),
    "offset": (OffsetOpt, 0),
    "maxactive": (MaxactiveOpt, 0),
}
FILTER_OPTIONS: dict[str, tuple[Any, Any]] = {"pid": (PidOpt, None), "tid": (TidOpt, None), "comm": (CommOpt, None)}
GUEST_OPTIONS: dict[str, tuple[Any, Any]] = {
    "arch": (ArchOpt, None),
    "kernel": (KernelOpt, None),
    "kernel_tree": (KernelTreeOpt, None),
    "target": (TargetOpt, None),
    "vagrantfile": (VagrantfileOpt, None),
}
