"""Terminal plumbing for the CLI: rich on stderr for people, JSON Lines on stdout for programs."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from kbridge import progress
from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.mechanisms.engine import MechanismResult
from kbridge.mechanisms.histogram import durations_of
from kbridge.mechanisms.singlestep import StepPairer
from kbridge.spec import Hit
from kbridge.targets.base import GuestCrash

if TYPE_CHECKING:
    from kbridge.kprobe_events import EventSyntaxError

err = Console(stderr=True, highlight=False, soft_wrap=True)  # an error stays one line when piped
out = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def _sink(kind: str, text: str) -> None:
    style = {"step": "dim", "done": "green", "fail": "red", "info": "cyan", "warn": "yellow"}[kind]
    mark = {"step": "…", "done": "✓", "fail": "✗", "info": "•", "warn": "!"}[kind]
    err.print(f"[{style}]{mark} {escape(text)}[/]")


def _syntax_error(e: KbridgeError) -> TypeGuard[EventSyntaxError]:
    # kbridge.kprobe_events (the grammar, slow to import) is loaded only by the commands that parse
    # event lines: if it was never imported, E cannot be one of its errors.
    events = sys.modules.get("kbridge.kprobe_events")
    return events is not None and isinstance(e, events.EventSyntaxError)


class Terminated(BaseException):
    """SIGTERM arrived: raised where the program was, so `finally` blocks undo what was armed."""


# A JSON line being written is finished before Ctrl-C or SIGTERM acts: a reader never gets half a
# line, and the summary's "streamed" counts exactly the lines written. (Python runs signal handlers
# in the main thread between bytecodes, so the flag below is all the synchronisation needed.)
_writing = False
_deferred: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    if _writing:
        _deferred.append(signum)
        return
    _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


def write_line(text: str) -> None:
    """TEXT and a newline on stdout, whole even when a signal arrives meanwhile."""
    global _writing
    _writing = True
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    finally:
        _writing = False
    if _deferred:
        _raise_for(_deferred.pop())


def command(fn: F) -> F:
    """Wrap a CLI command: progress to stderr, KbridgeError and Ctrl-C to a clean exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        progress.add_sink(_sink)
        # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so every cleanup block still runs.
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        _deferred.clear()
        try:
            return fn(*args, **kwargs)
        except Terminated:
            _stopped("SIGTERM", "terminated", 143)
        except typer.Exit:
            raise
        except GuestCrash as e:
            _interrupted_summary("crash", 3)
            err.print(f"[bold red]error:[/] {escape(e.message)}")
            if e.crash is not None:
                err.print(escape(e.crash.head()), markup=False, highlight=False)
                if e.crash.file is not None:
                    err.print(f"[dim]the whole report: {escape(str(e.crash.file))}[/]")
            else:
                err.print(escape(e.text), markup=False, highlight=False)
            if e.hint:
                err.print(f"[dim]hint: {escape(e.hint)}[/]")
            raise typer.Exit(3) from None
        except KbridgeError as e:
            if _syntax_error(e):  # a kprobe_events line: the message, then a caret under the bad part
                err.print(f"[bold red]error:[/] {escape(e.message)}{f' ({e.error})' if e.error else ''}")
                err.print(escape(e.caret()), markup=False, highlight=False)
                raise typer.Exit(2) from None
            err.print(f"[bold red]error:[/] {escape(e.message)}")
            if e.hint:
                err.print(f"[dim]hint: {escape(e.hint)}[/]")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _stopped("SIGINT", "interrupted", 130)
        except Exception as e:  # noqa: BLE001 - a bug must still end in one line and an exit code
            if os.environ.get("KBRIDGE_DEBUG"):
                traceback.print_exc()
            err.print(f"[bold red]internal error:[/] {escape(type(e).__name__)}: {escape(str(e))[:500]}")
            err.print("[dim]hint: this is a kbridge bug; KBRIDGE_DEBUG=1 shows the traceback[/]")
            raise typer.Exit(1) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.remove_sink(_sink)
            _json_stream.clear()

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps fn's signature; mypy cannot see it


_json_stream: list[HitPrinter] = []  # the --json hit stream of the running command, if any


def _stopped(signal: str, verb: str, code: int) -> NoReturn:
    """The end of a command a signal stopped: its summary, what was cleaned up, the exit code."""
    _interrupted_summary(signal, code)
    cleaned = "what kbridge armed in the guest was removed; a VM started for this command was stopped"
    err.print(f"[yellow]{verb}: {cleaned}[/]")
    raise typer.Exit(code) from None


def _interrupted_summary(signal_name: str, code: int) -> None:
    """A --json run cut short still ends with a summary line, marked interrupted."""
    if _json_stream:
        printer = _json_stream[-1]
        emit_json({"summary": {"interrupted": True, "signal": signal_name, "exit": code, "streamed": printer.shown}})


def emit_json(obj: dict) -> None:
    write_line(json.dumps(obj))


def hit_line(hit: Hit) -> str:
    args = " ".join(f"{k}={v}" for k, v in hit.args.items())
    ret = f" ret={hit.retval}" if hit.retval is not None else ""
    took = f" took {hit.duration_ns} ns" if hit.duration_ns is not None else ""
    trap = ""
    if hit.trap is not None:
        at = f" at {escape(hit.fault_at)}" if hit.fault_at else ""
        trap = f"{at} {get_arch(hit.arch).describe_trap(hit.trap) if hit.arch else f'trap={hit.trap}'}"
    regs = ""
    if hit.ip is not None:
        addr = f"addr={hit.addr:#x} " if hit.addr is not None else ""  # a tracefs hit has no probe address
        regs = f" [dim]{addr}{hit.ip_name}={hit.ip:#x} {hit.flags_name}={hit.flags or 0:#x}[/]"
    ts = f"{hit.timestamp:12.6f} " if hit.timestamp is not None else ""
    return (
        f"[dim]{ts}[/][bold]{hit.handler:5}[/] {escape(hit.comm)}[{hit.pid}] cpu{hit.cpu} "
        f"{escape(hit.symbol)} {escape(args)}{ret}{took}{trap}{regs}"
    )


def show_durations(r: MechanismResult) -> None:
    """The log2 histogram of return durations (the module's exact one, else from the hits streamed)."""
    hist = r.durations or durations_of(r.hits)
    if hist is None:
        return
    where = "every call, counted in the kernel" if hist.source == "module" else "the returns streamed"
    err.print(f"[bold]{r.mechanism}: return durations[/] ({hist.total} calls, {where})")
    for line in hist.text():
        err.print(f"  {line}", markup=False)


LIVE_LINES = 200  # hits printed live before the rest are only counted


class HitPrinter:
    """The on_hit sink of the CLI: JSON Lines on stdout, or the first LIVE_LINES hits on stderr."""

    def __init__(self, json_out: bool, fmt: Callable[[Hit], str] = hit_line) -> None:
        self.json_out = json_out
        self.fmt = fmt
        self.shown = 0
        self.steps = StepPairer()
        if json_out:
            _json_stream[:] = [self]

    def __call__(self, hit: Hit) -> None:
        if self.json_out:
            line = json.dumps(hit.to_json())
            try:
                write_line(line)
            finally:
                self.shown += 1  # the line is whole on stdout, even when a deferred signal is raised now
            return
        if self.shown < LIVE_LINES:
            err.print(self.fmt(hit))
            if (step := self.steps.feed(hit)) is not None:
                err.print(f"[cyan]      {escape(step.text())}[/]")
        self.shown += 1

    def finish(self) -> None:
        if not self.json_out and self.shown > LIVE_LINES:
            err.print(f"[dim]… {self.shown - LIVE_LINES} more hits not shown[/]")


def show_workload(description: str, exitcode: int | None, output: str) -> None:
    """Say when the workload failed, with the end of what it printed."""
    if exitcode not in (None, 0):
        err.print(f"[yellow]workload {escape(repr(description))} exited with {exitcode}[/]")
        if output.strip():
            err.print(output.strip()[-1000:], markup=False)
