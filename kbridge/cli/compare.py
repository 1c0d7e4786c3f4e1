"""`kbridge compare SYMBOL`: the same probe through kmod, tracefs and bpf, side by side."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from kbridge import progress
from kbridge.arch import Arch
from kbridge.cli import app
from kbridge.cli.options import (
    FILTER_OPTIONS,
    GUEST_OPTIONS,
    ArgOpt,
    EntryOpt,
    JsonOpt,
    PreOpt,
    RetOpt,
    chosen,
    guest_arch,
    handlers,
    with_options,
)
from kbridge.cli.output import command, emit_json, err, out
from kbridge.compare import Comparison, compare, workload_command
from kbridge.errors import KbridgeError
from kbridge.mechanisms import NAMES
from kbridge.mechanisms import get as get_mechanism
from kbridge.session import Session
from kbridge.spec import make_spec
from kbridge.targets import acquire, kept_running, parse_target, resolve_image


@app.command("compare")
@command
@with_options(FILTER_OPTIONS, GUEST_OPTIONS)
def compare_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function, e.g. ksys_write, vfs_read.")],
    pre: PreOpt = False,
    entry: EntryOpt = False,
    ret: RetOpt = False,
    arg: ArgOpt = None,
    run: Annotated[Optional[str], typer.Option("--run", help="Guest shell command (the workload).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=100, help="Workload repetitions per mechanism.")] = 5,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Mechanisms to run (default: all three).")] = None,
    json_out: JsonOpt = False,
    **opts: Any,
) -> None:
    """Run one probe through kmod, tracefs and bpf on one VM and compare hits, losses, args and overhead."""
    g = chosen(**{k: opts.pop(k) for k in GUEST_OPTIONS})
    a = guest_arch(g.arch, g.target)
    spec = make_spec(symbol, handlers(pre, False, entry, ret) or {"pre"}, arg, a, 0, 0, **opts)
    names = tuple(only or NAMES)
    for n in names:
        get_mechanism(n)  # an unknown name in --only fails here
    with acquire(a, _flavour(a, g.key, g.target), kernel=g.key, target=g.target) as guest:
        comp = compare(Session(guest), spec, workload_command(run, symbol), repeats, names)
    if json_out:
        for st in comp.mechanisms.values():
            for h in st.result.hits if st.result else []:
                emit_json(h.to_json())
        emit_json({"summary": comp.summary()})
    else:
        show(comp)


def _flavour(arch: Arch, suite: str, target: str | None) -> str:
    """bcc, so all three mechanisms run; the default image (bpf skipped) if the bcc one cannot be built."""
    if parse_target(target).kind != "qemu" or kept_running(arch, suite):
        return "bcc"  # a running guest is used as it is: bpf runs if it has bcc
    try:
        resolve_image(arch, suite, "bcc")
        return "bcc"
    except KbridgeError as e:
        progress.warn(f"no bcc image ({e.message}); booting the default image, bpf is skipped")
        return "default"


def _ns(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def show(comp: Comparison) -> None:
    t = Table(title=f"{comp.symbol} on {comp.kernel} ({comp.arch}, {comp.accel}): {comp.workload} x{comp.repeats}")
    for col, just in (
        ("via", "left"),
        ("hits", "right"),
        ("missed", "right"),
        ("lost", "right"),
        ("agree", "left"),
        ("1st hit", "right"),
        ("setup", "right"),
        ("run µs (spread)", "right"),
        ("ns/hit", "right"),
    ):
        t.add_column(col, justify="right" if just == "right" else "left")
    base = comp.baseline_ns
    t.add_row("none", "", "", "", "", "", "", f"{_ns(_med(base) / 1e3 if base else None)} ({_sp(base)})", "")
    for st in comp.mechanisms.values():
        r = st.result
        if r is None:
            t.add_row(st.name, f"[yellow]skipped: {st.skipped}[/]", "", "", "", "", "", "", "")
            continue
        t.add_row(
            st.name,
            str(r.total),
            str(r.missed),
            str(r.lost),
            st.agree,
            f"{r.first_event_s * 1e3:.1f} ms" if r.first_event_s is not None else "-",
            f"{st.setup_s:.1f} s" if st.setup_s is not None else "-",
            f"{_ns(_med(st.durations_ns) / 1e3 if st.durations_ns else None)} ({_sp(st.durations_ns)})",
            _ns(st.overhead_ns),
        )
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
