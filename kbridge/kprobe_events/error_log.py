"""The kernel's verdict on a line: EventSyntaxError (offline) and tracing/error_log (from a guest)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kbridge.errors import KbridgeError
from kbridge.kprobe_events.grammar import ERROR_CLASSES, OLD_MESSAGES


class EventSyntaxError(KbridgeError):
    """A line the kernel would reject, with the kernel's own verdict.

    ``error`` is the trace_probe.h class name (None when 6.1 rejects the line
    with -EINVAL but writes nothing to error_log), ``message`` its text,
    ``position`` the caret column in the original ``line``.  ``command`` and
    ``kernel_position`` are what error_log shows: the command re-joined with
    single spaces and the caret column in it.  ``position`` maps that column
    back onto ``line``: same word, same distance from the word's start.
    """

    def __init__(
        self,
        line: str,
        error: str | None,
        message: str,
        position: int | None = None,
        command: str | None = None,
        kernel_position: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = f" at column {position}" if position is not None else ""
        label = f" ({error})" if error else ""
        super().__init__(
            f"kprobe_events would reject {line!r}: {message}{label}{where}",
            hint=hint or "see Documentation/trace/kprobetrace.rst of that kernel",
        )
        self.specific_hint = hint  # what to write instead, where kbridge knows it
        self.message = message
        self.error = error
        self.line = line
        self.position = position
        self.command = command
        self.kernel_position = kernel_position

    def __str__(self) -> str:
        return str(self.args[0]) + f"\n  hint: {self.hint}"

    def caret(self) -> str:
        """The line and, under it, a ``^`` at the error position (control characters shown as '?')."""
        shown = "".join("?" if ord(c) < 0x20 and c != "\t" else c for c in self.line)
        if self.position is None:
            return f"{shown}\n"
        # Copy tabs so the caret lines up under tab-indented input too.
        pad = "".join(c if c == "\t" else " " for c in shown[: self.position])
        return f"{shown}\n{pad}{' ' * (self.position - len(pad))}^"

    def log_entry(self, timestamp: float = 0.0) -> ErrorLogEntry | None:
        """The error_log entry 6.1 would write for this line, if any."""
        if self.error is None or self.command is None or self.kernel_position is None:
            return None
        return ErrorLogEntry(timestamp, "trace_kprobe", self.message, self.command, self.kernel_position)


CMD_PREFIX = "  Command: "  # kernel/trace/trace.c


@dataclass(frozen=True)
class ErrorLogEntry:
    """One entry of tracing/error_log."""

    timestamp: float
    subsystem: str
    error: str
    command: str
    position: int

    @property
    def error_class(self) -> str | None:
        """The trace_probe.h class of ``error`` (None for other subsystems)."""
        return ERROR_CLASSES.get(self.error) or OLD_MESSAGES.get(self.error)

    def __str__(self) -> str:
        # tracing_err_log_seq_show(): "[%5llu.%06u] %s%s" loc, text, then
        # "\n  Command: %s\n", then CMD_PREFIX-wide + pos spaces and "^".
        sec, usec = divmod(round(self.timestamp * 1_000_000), 1_000_000)
        return (
            f"[{sec:5d}.{usec:06d}] {self.subsystem}: error: {self.error}\n"
            f"{CMD_PREFIX}{self.command}\n"
            f"{' ' * (len(CMD_PREFIX) + self.position)}^\n"
        )


_LOG_HEAD = re.compile(r"\[\s*(\d+)\.(\d{6})\] (.+?): error: (.*)")


def parse_error_log(text: str) -> list[ErrorLogEntry]:
    """Parse the contents of tracing/error_log (6.1's tracing_log_err format)."""
    entries = []
    lines = text.splitlines()
    i = 0
    while i + 2 < len(lines):
        head = _LOG_HEAD.fullmatch(lines[i])
        if not (head and lines[i + 1].startswith(CMD_PREFIX) and lines[i + 2].endswith("^")):
            i += 1
            continue
        sec, usec, subsystem, error = head.groups()
        entries.append(
            ErrorLogEntry(
                timestamp=int(sec) + int(usec) / 1_000_000,
                subsystem=subsystem,
                error=error,
                command=lines[i + 1][len(CMD_PREFIX) :],
                position=len(lines[i + 2]) - 1 - len(CMD_PREFIX),
            )
        )
        i += 3
    return entries
