"""`kbridge probe SYMBOL`, the command itself: no typer, no rich until the table at the end.

kbridge.cli.probe declares its options for typer; kbridge.cli.fast parses the usual command lines
without typer. Both call probe() here.
"""

from __future__ import annotations

from typing import Any

from kbridge import kernels
from kbridge.cli.common import (
    explain_fault_removed,
    explain_removed,
    guest_arch,
    options_of,
    spec_of,
    use_vagrantfile,
    with_options,
    workload,
)
from kbridge.cli.output import HitPrinter, emit_json, err, show_durations, show_workload
from kbridge.cli.term import escape
from kbridge.images.apt import Mirrors
from kbridge.mechanisms import get as get_mechanism
from kbridge.mechanisms.engine import StopRule
from kbridge.probe import ProbeRun
from kbridge.probe import probe as run_probe


def mirrors_from(mirror: str | None, suite: str) -> Mirrors | None:
    """--mirror as the image builder's Mirrors (None: the host's apt sources)."""
    if mirror is None:
        return None
    from kbridge.cli.image import mirrors_from as parse

    return parse(mirror, suite)


# spec_of()'s options (--pre ... --comm) stand in probe()'s signature where **spec_opts does: the fast
# path fills every parameter of that signature (tests/unit/test_cli_fast.py checks it against typer's).
@with_options(options_of(spec_of, "symbol", "arch", "fault"))
def probe(
    symbol: str,
    run: str | None = None,
    count: int | None = None,
    duration: float | None = None,
    via: str = "kmod",
    arch: str | None = None,
    kernel: str | None = None,
    kernel_tree: str | None = None,
    target: str | None = None,
    vagrantfile: str | None = None,
    mirror: str | None = None,
    json_out: bool = False,
    jprobe: bool = False,
    fault: bool = False,
    **spec_opts: Any,
) -> None:
    """Probe SYMBOL in a guest kernel and show every hit (default mechanism: a generated module)."""
    explain_removed(jprobe)
    key = kernels.resolve(kernel, kernel_tree)
    version = kernels.version_of(key)
    if fault and (version is None or version >= (5, 14)):
        raise explain_fault_removed(version)
    get_mechanism(via)  # an unknown --via fails before anything else
    use_vagrantfile(vagrantfile)
    a = guest_arch(arch, target)
    spec = spec_of(symbol, a, fault=fault, **spec_opts)
    printer = HitPrinter(json_out)
    result = run_probe(
        spec,
        a,
        workload(run),
        StopRule(count=count, duration=duration),
        printer,
        via=via,
        kernel=key,
        mirrors=mirrors_from(mirror, kernels.suite_of(key)),
        target=target,
    )
    if json_out:
        emit_json({"summary": result.summary()})
    else:
        printer.finish()
        show_summary(result)


def show_summary(run: ProbeRun) -> None:
    from rich.table import Table

    table = Table(title=f"{run.resolution.symbol} on {run.kernel} ({run.arch}, {run.accel})")
    table.add_column("mechanism")
    table.add_column("handler")
    table.add_column("hits (exact)", justify="right")
    table.add_column("streamed", justify="right")
    table.add_column("missed", justify="right")
    table.add_column("lost output", justify="right")
    for r in run.results:
        streamed = {h: sum(1 for x in r.hits if x.handler == h) for h in r.counters}
        for i, (handler, n) in enumerate(r.counters.items()):
            table.add_row(
                r.mechanism if i == 0 else "",
                handler,
                str(n),
                str(streamed[handler]),
                str(r.missed) if i == 0 else "",
                str(r.lost) if i == 0 else "",
            )
    err.print(table)
    for r in run.results:
        if r.total > len(r.hits) and r.lost == 0:
            err.print(
                f"[dim]streamed {len(r.hits)} of {r.total} hits (--count stopped the stream; "
                "the exact counts above include every hit)[/]"
            )
        if r.missed:
            err.print(
                f"[dim]missed: {r.missed} hits the kernel skipped (nmissed: the probe fired while "
                "another kprobe handler was running)[/]"
            )
        for note in r.notes:
            err.print(f"[dim]{escape(note)}[/]")
        if r.total == 0:
            err.print(
                f"[yellow]no hits: the workload {escape(repr(run.workload.description))} did not make "
                f"the kernel run {escape(run.resolution.symbol)} (busybox cat, for one, copies with "
                "sendfile, not read). Try --run with a command that does, or --duration S to watch the "
                "whole guest.[/]"
            )
        show_durations(r)
        show_workload(run.workload.description, r.workload_exit, r.workload_output)
