"""`kbridge probe SYMBOL`: one probe, built, loaded and heard from in a guest."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.image import MirrorOpt, mirrors_from
from kbridge.cli.output import command, emit_json, err, hit_line
from kbridge.errors import KbridgeError
from kbridge.mechanisms.common import StopRule
from kbridge.probe import ProbeRun, probe as run_probe
from kbridge.spec import Hit, make_spec
from kbridge.workload import Workload

LIVE_LINES = 200  # hits printed live before the rest are only counted

ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Guest architecture: x86_64 or arm64 (default: the host's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON Lines on stdout: one object per hit, then a summary.")]


def explain_removed(jprobe: bool, fault_handler: bool) -> None:
    """kprobe features that no longer exist: say what replaced them instead of failing obscurely."""
    if jprobe:
        raise KbridgeError(
            "jprobes were removed in Linux 4.15 (commit 590c84593045); they mirrored the probed "
            "function's signature to read its arguments",
            "use --arg NAME=N to fetch the Nth argument from the registers at entry "
            "(e.g. --pre --arg fd=1), or --entry with a kretprobe")
    if fault_handler:
        raise KbridgeError(
            "kprobe fault_handler was removed in Linux 5.14 (commit ec6aba3d2be1): no in-tree "
            "user handled faults in it",
            "handlers that touch user memory should use copy_from_user_nofault(), as kbridge's do")


@app.command("probe")
@command
def probe_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function, e.g. sys_write, ksys_write, vfs_read.")],
    pre: Annotated[bool, typer.Option("--pre", help="kprobe pre-handler (before the probed instruction).")] = False,
    post: Annotated[bool, typer.Option("--post", help="kprobe post-handler (after single-stepping it).")] = False,
    entry: Annotated[bool, typer.Option("--entry", help="kretprobe entry handler.")] = False,
    ret: Annotated[bool, typer.Option("--ret", help="kretprobe return handler (with the return value).")] = False,
    arg: Annotated[Optional[list[str]], typer.Option("--arg", help="NAME=N: report the Nth (1-based) argument as NAME.")] = None,
    offset: Annotated[int, typer.Option("--offset", help="Probe at SYMBOL+OFFSET (kprobe only).")] = 0,
    maxactive: Annotated[int, typer.Option("--maxactive", help="kretprobe instances (0: kernel default).")] = 0,
    pid: Annotated[Optional[int], typer.Option("--pid", help="Only count this guest process (tgid).")] = None,
    comm: Annotated[Optional[str], typer.Option("--comm", help="Only count tasks with this comm.")] = None,
    run: Annotated[Optional[str], typer.Option("--run", help="Guest shell command to run while armed.")] = None,
    count: Annotated[Optional[int], typer.Option("--count", min=1, help="Stop after N hits.")] = None,
    duration: Annotated[Optional[float], typer.Option("--duration", min=0.1, help="Stop after S seconds.")] = None,
    via: Annotated[str, typer.Option("--via", help="Mechanism: kmod, tracefs or bpf.")] = "kmod",
    arch: ArchOpt = None,
    mirror: MirrorOpt = None,
    json_out: JsonOpt = False,
    jprobe: Annotated[bool, typer.Option("--jprobe", hidden=True)] = False,
    fault_handler: Annotated[bool, typer.Option("--fault-handler", hidden=True)] = False,
) -> None:
    """Probe SYMBOL in a guest kernel and show every hit (default mechanism: a generated module)."""
    explain_removed(jprobe, fault_handler)
    if via not in ("kmod", "tracefs", "bpf"):
        raise KbridgeError(f"unknown mechanism {via!r} in --via", "use kmod, tracefs or bpf")
    target_arch = get_arch(arch)
    handlers = {h for h, on in (("pre", pre), ("post", post), ("entry", entry), ("ret", ret)) if on}
    spec = make_spec(symbol, handlers, arg, target_arch, offset, maxactive, pid, comm)
    shown = [0]

    def on_hit(hit: Hit) -> None:
        if json_out:
            emit_json(hit.to_json())
        elif shown[0] < LIVE_LINES:
            err.print(hit_line(hit))
        shown[0] += 1

    result = run_probe(spec, target_arch, Workload.shell(run) if run else None,
                       StopRule(count=count, duration=duration), on_hit, via=via, mirrors=mirrors_from(mirror))
    if json_out:
        emit_json({"summary": result.summary()})
    else:
        show_summary(result, shown[0])


def show_summary(run: ProbeRun, streamed: int) -> None:
    if streamed > LIVE_LINES:
        err.print(f"[dim]… {streamed - LIVE_LINES} more hits not shown[/]")
    table = Table(title=f"{run.resolution.symbol} on {run.kernel} ({run.arch}, {run.accel})")
    table.add_column("mechanism")
    table.add_column("handler")
    table.add_column("hits (exact)", justify="right")
    table.add_column("missed", justify="right")
    table.add_column("lost output", justify="right")
    for r in run.results:
        for i, (handler, n) in enumerate(r.counters.items()):
            table.add_row(r.mechanism if i == 0 else "", handler, str(n),
                          str(r.missed) if i == 0 else "", str(r.lost) if i == 0 else "")
    err.print(table)
    for r in run.results:
        if r.total == 0:
            err.print(f"[yellow]no hits: the workload {run.workload.description!r} did not make the kernel "
                      f"run {run.resolution.symbol} (busybox cat, for one, copies with sendfile, not read)."
                      " Try --run with a command that does, or --duration S to watch the whole guest.[/]")
        if r.workload_exit not in (None, 0):
            err.print(f"[yellow]workload {run.workload.description!r} exited with {r.workload_exit}[/]")
            if r.workload_output.strip():
                err.print(r.workload_output.strip()[-1000:], markup=False)
