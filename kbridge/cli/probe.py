"""`kbridge probe SYMBOL`: one probe, armed through one mechanism in a guest, every hit heard from.

The options as typer declares them (help, usage errors); the command is kbridge.cli.probing.probe.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kbridge.cli import app, probing
from kbridge.cli.options import (
    FILTER_OPTIONS,
    SPEC_OPTIONS,
    ArchOpt,
    CountOpt,
    DurationOpt,
    FaultOpt,
    JprobeOpt,
    JsonOpt,
    KernelOpt,
    KernelTreeOpt,
    MirrorOpt,
    RunOpt,
    TargetOpt,
    VagrantfileOpt,
    ViaOpt,
    with_options,
)
from kbridge.cli.output import command


@app.command("probe")
@command
@with_options(SPEC_OPTIONS, FILTER_OPTIONS)
def probe_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function, e.g. sys_write, ksys_write, vfs_read.")],
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
    **opts: Any,
) -> None:
    """Probe SYMBOL in a guest kernel and show every hit (default mechanism: a generated module)."""
    given = dict(locals())
    probing.probe(**given.pop("opts"), **given)
