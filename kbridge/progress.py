"""Progress of long work, as events a front end can show (the CLI draws them with rich on stderr).

The library only emits; it never prints. A sink is a callable taking (kind, text):
kind is "step" (a long step starts), "done" (it ended), "fail" (it raised), "info"
(a fact worth showing) or "warn".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Sink = Callable[[str, str], None]

_sinks: list[Sink] = []


def add_sink(sink: Sink) -> None:
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def emit(kind: str, text: str) -> None:
    for sink in list(_sinks):
        sink(kind, text)


def info(text: str) -> None:
    emit("info", text)


def warn(text: str) -> None:
    emit("warn", text)


@contextmanager
def step(text: str) -> Iterator[None]:
    """Announce a long step and how long it took."""
    start = time.monotonic()
    emit("step", text)
    try:
        yield
    except BaseException:
        emit("fail", f"{text}: failed after {time.monotonic() - start:.1f} s")
        raise
    emit("done", f"{text} ({time.monotonic() - start:.1f} s)")
