"""`kbridge compare SYMBOL`: the same probe through kmod, tracefs and bpf, side by side."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.output import command, emit_json, err, out
from kbridge.compare import Comparison, compare, open_compare_target, workload_command
from kbridge.mechanisms import NAMES
from kbridge.session import Session
from kbridge.spec import make_spec


@app.command("compare")
@command
def compare_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function, e.g. ksys_write, vfs_read.")],
    pre: Annotated[bool, typer.Option("--pre", help="kprobe pre-handler (the default unless --ret/--entry).")] = False,
    entry: Annotated[bool, typer.Option("--entry")] = False,
    ret: Annotated[bool, typer.Option("--ret", help="kretprobe return handler (return values compared).")] = False,
    arg: Annotated[Optional[list[str]], typer.Option("--arg", help="NAME=N: fetch the Nth argument as NAME.")] = None,
    pid: Annotated[Optional[int], typer.Option("--pid", help="Only count this guest tgid.")] = None,
    comm: Annotated[Optional[str], typer.Option("--comm", help="Only count tasks with this comm (e.g. dd).")] = None,
    run: Annotated[Optional[str], typer.Option("--run", help="Guest shell command (the workload).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=100, help="Workload repetitions per mechanism.")] = 5,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Mechanisms to run (default: all three).")] = None,
    arch: Annotated[Optional[str], typer.Option("--arch", help="x86_64 or arm64 (default: the host's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON Lines: each mechanism's hits, then a summary.")] = False,
) -> None:
    """Run one probe through kmod, tracefs and bpf on one VM and compare hits, losses, args and overhead."""
    a = get_arch(arch)
    handlers = {h for h, on in (("pre", pre), ("entry", entry), ("ret", ret)) if on} or {"pre"}
    spec = make_spec(symbol, handlers, arg, a, 0, 0, pid, comm)
    names = tuple(only or NAMES)
    for n in names:
        if n not in NAMES:
            from kbridge.errors import KbridgeError

            raise KbridgeError(f"unknown mechanism {n!r} in --only", f"use {', '.join(NAMES)}")
    vm, _ = open_compare_target(a)
    with vm:
        comp = compare(Session(vm), spec, workload_command(run, symbol), repeats, names)
    if json_out:
        for st in comp.mechanisms.values():
            for h in (st.result.hits if st.result else []):
                emit_json(h.to_json())
        emit_json({"summary": comp.summary()})
    else:
        show(comp)


def _ns(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def show(comp: Comparison) -> None:
    t = Table(title=f"{comp.symbol} on {comp.kernel} ({comp.arch}, {comp.accel}): {comp.workload} x{comp.repeats}")
    for col, just in (("via", "left"), ("hits", "right"), ("missed", "right"), ("lost", "right"),
                      ("agree", "left"), ("1st hit", "right"), ("setup", "right"),
                      ("run µs (spread)", "right"), ("ns/hit", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    base = comp.baseline_ns
    t.add_row("none", "", "", "", "", "", "",
              f"{_ns(_med(base) / 1e3 if base else None)} ({_sp(base)})", "")
    for st in comp.mechanisms.values():
        r = st.result
        if r is None:
            t.add_row(st.name, f"[yellow]skipped: {st.skipped}[/]", "", "", "", "", "", "", "")
            continue
        t.add_row(st.name, str(r.total), str(r.missed), str(r.lost), st.agree,
                  f"{r.first_event_s * 1e3:.1f} ms" if r.first_event_s is not None else "-",
                  f"{st.setup_s:.1f} s" if st.setup_s is not None else "-",
                  f"{_ns(_med(st.durations_ns) / 1e3 if st.durations_ns else None)} ({_sp(st.durations_ns)})",
                  _ns(st.overhead_ns))
    out.print(t)
    if comp.equal_counts:
        err.print("[green]✓ every mechanism counted the same hits[/]")
    elif comp.equal_counts is False:
        err.print("[yellow]! the hit counts differ:[/]")
        for line in comp.explanation:
            err.print(f"  {line}", markup=False)


def _med(xs: list[int]) -> float:
    import statistics

    return statistics.median(xs)


def _sp(xs: list[int]) -> str:
    return f"{min(xs) / 1e3:,.0f}-{max(xs) / 1e3:,.0f}" if xs else "-"
