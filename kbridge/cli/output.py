"""Terminal plumbing for the CLI: rich on stderr for people, JSON Lines on stdout for programs."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from kbridge import progress
from kbridge.errors import KbridgeError
from kbridge.spec import Hit
from kbridge.targets.base import GuestCrash

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def _sink(kind: str, text: str) -> None:
    style = {"step": "dim", "done": "green", "fail": "red", "info": "cyan", "warn": "yellow"}[kind]
    mark = {"step": "…", "done": "✓", "fail": "✗", "info": "•", "warn": "!"}[kind]
    err.print(f"[{style}]{mark} {escape(text)}[/]")


def command(fn: F) -> F:
    """Wrap a CLI command: progress to stderr, KbridgeError and Ctrl-C to a clean exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        progress.add_sink(_sink)
        try:
            return fn(*args, **kwargs)
        except GuestCrash as e:
            err.print(f"[bold red]error:[/] {escape(e.message)}")
            err.print(escape(e.text))
            if e.hint:
                err.print(f"[dim]hint: {escape(e.hint)}[/]")
            raise typer.Exit(3) from None
        except KbridgeError as e:
            err.print(f"[bold red]error:[/] {escape(e.message)}")
            if e.hint:
                err.print(f"[dim]hint: {escape(e.hint)}[/]")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted: probes removed, modules unloaded, VM stopped[/]")
            raise typer.Exit(130) from None
        finally:
            progress.remove_sink(_sink)

    return wrapper  # type: ignore[return-value]


def emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def hit_line(hit: Hit) -> str:
    args = " ".join(f"{k}={v}" for k, v in hit.args.items())
    ret = f" ret={hit.retval}" if hit.retval is not None else ""
    ts = f"{hit.timestamp:12.6f} " if hit.timestamp is not None else ""
    return (f"[dim]{ts}[/][bold]{hit.handler:5}[/] {escape(hit.comm)}[{hit.pid}] cpu{hit.cpu} "
            f"{escape(hit.symbol)} {escape(args)}{ret}")
