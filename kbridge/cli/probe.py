"""`kbridge probe SYMBOL`: one probe, armed through one mechanism in a guest, every hit heard from.

The options as typer declares them (help, usage errors); the command is kbridge.cli.probing.probe.
"""

from __future__ import annotations

from typing import Annotated

import typer

from kbridge.cli import app, probing
from kbridge.cli.options import (
    ArchOpt,
    ArgOpt,
    CommOpt,
    CountOpt,
    DurationOpt,
    EntryOpt,
    FaultOpt,
    JprobeOpt,
    JsonOpt,
    KernelOpt,
    KernelTreeOpt,
    MaxactiveOpt,
    MirrorOpt,
    OffsetOpt,
    PidOpt,
    PostOpt,
    PreOpt,
    RetOpt,
    RunOpt,
    TargetOpt,
    TidOpt,
    VagrantfileOpt,
    ViaOpt,
)
from kbridge.cli.output import command


@app.command("probe")
@command
def probe_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function, e.g. sys_write, ksys_write, vfs_read.")],
    pre: PreOpt = False,
    post: PostOpt = False,
    entry: EntryOpt = False,
    ret: RetOpt = False,
    arg: ArgOpt = None,
    offset: OffsetOpt = 0,
    maxactive: MaxactiveOpt = 0,
    pid: PidOpt = None,
    tid: TidOpt = None,
    comm: CommOpt = None,
    run: RunOpt = None,
    count: CountOpt = None,
    duration: DurationOpt = None,
    via: ViaOpt = "kmod",
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    kernel_tree: KernelTreeOpt = None,
    target: TargetOpt = None,
    vagrantfile: VagrantfileOpt = None,
    mirror: MirrorOpt = None,
    json_out: JsonOpt = False,
    jprobe: JprobeOpt = False,
    fault: FaultOpt = False,
) -> None:
    """Probe SYMBOL in a guest kernel and show every hit (default mechanism: a generated module)."""
    probing.probe(**locals())
