"""`kbridge trace LINE...`: kprobe_events lines as written, driven in a guest, read back from trace_pipe.

The options as typer declares them (help, usage errors); the command is kbridge.cli.tracing.trace.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from kbridge.cli import app, tracing
from kbridge.cli.options import (
    FILTER_OPTIONS,
    GUEST_OPTIONS,
    CountOpt,
    DurationOpt,
    JsonOpt,
    RunOpt,
    with_options,
)
from kbridge.cli.output import command


@app.command("trace", context_settings={"ignore_unknown_options": True})
@command
@with_options(FILTER_OPTIONS, GUEST_OPTIONS)
def trace_cmd(
    lines: Annotated[list[str], typer.Argument(help="kprobe_events lines, e.g. 'p:myw ksys_write fd=$arg1'.")],
    check: Annotated[bool, typer.Option("--check", help="Only validate the lines offline (no VM).")] = False,
    run: RunOpt = None,
    duration: DurationOpt = None,
    count: CountOpt = None,
    filter_: Annotated[Optional[str], typer.Option("--filter", help="Event filter, e.g. 'fd == 1'.")] = None,
    buffer_kb: Annotated[
        Optional[int], typer.Option("--buffer-kb", min=1, help="Ring buffer size per CPU (KiB), restored after.")
    ] = None,
    json_out: JsonOpt = False,
    steps: Annotated[
        bool,
        typer.Option(
            "--steps",
            help="Print each tracefs operation as it is done (kprobe_events, the event's directory, "
            "filter, enable, trace_pipe, kprobe_profile, the -: removal) with the files read "
            "back.",
        ),
    ] = False,
    **opts: Any,
) -> None:
    """Define kprobe events in a guest, run a workload, stream the events from trace_pipe, remove them."""
    given = dict(locals())
    tracing.trace(**given.pop("opts"), **given)
