"""`kbridge trace LINE...`, the command itself: no typer, no rich until the table at the end.

kbridge.cli.trace declares its options for typer; kbridge.cli.fast parses the usual command lines
without typer. Both call trace() here.
"""

from __future__ import annotations

import math

from kbridge import kernels, kprobe_events
from kbridge.arch import Arch
from kbridge.cli.common import guest_arch, use_vagrantfile, workload
from kbridge.cli.output import CommandExit, HitPrinter, emit_json, err, show_durations, show_workload
from kbridge.cli.term import escape
from kbridge.errors import KbridgeError
from kbridge.images.grammar import grammar_of
from kbridge.mechanisms import tracefs
from kbridge.mechanisms.engine import MechanismResult, StopRule
from kbridge.mechanisms.tracefs import render
from kbridge.mechanisms.tracefs.guest import build_filter
from kbridge.mechanisms.tracefs.steps import Step
from kbridge.session import Session
from kbridge.spec import Hit
from kbridge.targets import acquire
from kbridge.targets.base import Target
from kbridge.workload import Workload, default_for


def check_verdict(line: str, grammar: kprobe_events.Grammar, arch: Arch) -> dict:
    """The offline verdict on LINE as `--check --json` prints it."""
    try:
        _check_one(line, grammar, arch)
    except kprobe_events.EventSyntaxError as e:
        refused = {"ok": False, "error": e.error, "position": e.position, "message": e.message, "line": line}
        return refused | ({"hint": e.specific_hint} if e.specific_hint else {})
    except KbridgeError as e:
        return {"ok": False, "error": "NO_BTF_ENTRY", "position": None, "message": e.message, "line": line}
    verdict: dict = {"ok": True, "error": None, "position": None, "message": None, "line": line}
    if dropped := kprobe_events.dropped_args(line):
        verdict["warning"] = (
            f"the kernel records the first {kprobe_events.MAX_TRACE_ARGS} arguments and drops {dropped}"
        )
    return verdict


def _check_one(line: str, grammar: kprobe_events.Grammar, arch: Arch) -> None:
    """LINE as the kernel would take it, offline: its syntax, and BTF names on a module kbridge built."""
    ev = kprobe_events.parse(line, grammar)
    if isinstance(ev, kprobe_events.ProbeEvent):
        render.refuse_btf_on_built_modules([ev], arch)


def _show_syntax_error(e: kprobe_events.EventSyntaxError, json_out: bool) -> None:
    if json_out:
        emit_json({"ok": False, "error": e.error, "position": e.position, "message": e.message, "line": e.line})
    label = f" ({e.error})" if e.error else ""
    err.print(f"[bold red]error:[/] {escape(e.message)}{label}")
    err.print(e.caret(), markup=False, highlight=False)  # as it is: markup=False prints no escapes away
    if e.specific_hint:
        err.print(f"[dim]{escape(e.specific_hint)}[/]")


def _hit_text(hit: Hit) -> str:
    args = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in hit.args.items())
    ts = f"{hit.timestamp:12.6f} " if hit.timestamp is not None else ""
    event = getattr(hit, "event", hit.symbol)
    took = f" took {hit.duration_ns} ns" if hit.duration_ns is not None else ""
    return f"[dim]{ts}[/]{escape(hit.comm)}[{hit.pid}] cpu{hit.cpu} [bold]{escape(event)}[/] {escape(args)}{took}"


def _raw_and_parsed(hit: Hit) -> str:
    """--steps: the kernel's trace line as `cat trace_pipe` prints it, then kbridge's reading of it."""
    raw = getattr(hit, "raw", "")
    return f"[dim]trace_pipe:[/] {escape(raw)}\n[dim]   kbridge:[/] {_hit_text(hit)}" if raw else _hit_text(hit)


def _show_step(step: Step) -> None:
    """One tracefs operation as the walk-through writes it, then what the kernel shows there now."""
    style = "cyan" if step.ok else "red"
    err.print(f"[{style}]$ {escape(step.command)}[/]")
    for path, text in step.readback.items():
        lines = text.rstrip("\n").splitlines() or ["(empty)"]
        err.print(f"[dim]  {escape(path)}:[/] {escape(lines[0])}")
        for line in lines[1:]:
            err.print(f"  {' ' * len(path)}  {escape(line)}", markup=False)
    if step.note:
        err.print(f"[dim]  # {escape(step.note)}[/]")


def trace(
    lines: list[str],
    check: bool = False,
    run: str | None = None,
    duration: float | None = None,
    count: int | None = None,
    filter_: str | None = None,
    pid: int | None = None,
    tid: int | None = None,
    comm: str | None = None,
    buffer_kb: int | None = None,
    arch: str | None = None,
    kernel: str | None = None,
    kernel_tree: str | None = None,
    target: str | None = None,
    vagrantfile: str | None = None,
    json_out: bool = False,
    steps: bool = False,
) -> None:
    """Define kprobe events in a guest, run a workload, stream the events from trace_pipe, remove them."""
    use_vagrantfile(vagrantfile)
    a = guest_arch(arch, target)
    suite = kernels.resolve(kernel, kernel_tree)
    grammar = grammar_of(a, suite)  # the built image's kernel, else the suite's table
    if check:
        bad = 0
        for line in lines:
            if json_out:
                verdict = check_verdict(line, grammar, a)
                emit_json(verdict)
                bad += not verdict["ok"]
                continue
            try:
                _check_one(line, grammar, a)
                if dropped := kprobe_events.dropped_args(line):
                    err.print(
                        f"[yellow]! {escape(line[:60])}...: the kernel accepts it, records the first "
                        f"{kprobe_events.MAX_TRACE_ARGS} arguments and drops {dropped} without a word[/]"
                    )
                    bad += 1
                    continue
                err.print(f"[green]✓[/] {escape(line)}")
            except kprobe_events.EventSyntaxError as e:
                _show_syntax_error(e, False)
                bad += 1
            except KbridgeError as e:
                err.print(f"[bold red]error:[/] {escape(e.message)}")
                if e.hint:
                    err.print(f"[dim]{escape(e.hint)}[/]")
                bad += 1
        if bad:
            raise CommandExit(1)
        return
    try:
        parsed = render.check_lines(lines, grammar)  # before any VM boots
        render.refuse_btf_on_built_modules(parsed, a)
    except kprobe_events.EventSyntaxError as e:
        _show_syntax_error(e, json_out)
        raise CommandExit(2) from None
    build_filter(filter_, [t for t in (pid, tid) if t], comm)  # bad --pid/--comm fail before any boot too
    if run:
        work = workload(run)
    elif duration is not None:
        secs = str(math.ceil(duration) + 1)
        work = Workload(("/bin/busybox", "sleep", secs), f"sleep {secs}")
    else:
        work = default_for(next((p.symbol for p in parsed if p.symbol), ""))
    assert work is not None
    printer = HitPrinter(json_out, _raw_and_parsed if steps else _hit_text)
    with acquire(a, kernel=suite, target=target) as guest:
        session = Session(guest)
        try:
            result = tracefs.run_lines(
                session,
                list(lines),
                work,
                StopRule(count=count, duration=duration),
                printer,
                filter=filter_,
                buffer_kb=buffer_kb,
                pid=pid,
                tid=tid,
                comm=comm,
                steps=_show_step if steps else None,
            )
        except kprobe_events.EventSyntaxError as e:
            _show_syntax_error(e, json_out)
            err.print("[dim]the guest kernel's verdict, from tracing/error_log; kprobe_events is as it was[/]")
            raise CommandExit(2) from None
        summary = _summary(result, lines, guest, work)
    if json_out:
        emit_json({"summary": summary})
    else:
        printer.finish()
        _show_summary(result, summary)


def _summary(r: MechanismResult, lines: list[str], guest: Target, work: Workload) -> dict:
    return {
        "mechanisms": {"tracefs": r.summary()},
        "events": list(lines),
        "arch": guest.arch.name,
        "kernel": guest.krel,
        "accel": guest.accel,
        "target": guest.name,
        "workload": work.description,
        "workload_exit": r.workload_exit,
        "notes": r.notes,
    }


def _show_summary(r: MechanismResult, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"tracefs on {summary['kernel']} ({summary['arch']}, {summary['accel']})")
    table.add_column("event")
    table.add_column("events read", justify="right")
    for name, n in r.counters.items():
        table.add_row(name, str(n))
    table.add_row("[dim]lost (ring buffer overrun)[/]", str(r.lost))
    table.add_row("[dim]missed (kprobe_profile)[/]", str(r.missed))
    err.print(table)
    show_durations(r)
    show_workload(summary["workload"], r.workload_exit, r.workload_output)
