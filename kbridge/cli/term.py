"""A terminal line printer that speaks the part of rich's markup kbridge uses, without importing rich.

A warm `kbridge probe` is a few guest round trips; importing rich (and typer) cost more host CPU
than all of them. The lines a command prints while it runs (progress, hits, errors) go through
this printer; rich is imported only for what needs it (a table at the end of a run), by
`print()` itself when it is handed something other than text.

Markup as rich reads it: `[bold red]text[/]`, `[dim]`, `[/dim]`; a `[` preceded by an odd number of
backslashes is literal (rich.markup.escape()'s output reads back as its input). Styles become ANSI
SGR codes on a terminal (unless NO_COLOR is set or TERM is dumb) and nothing otherwise, which is what
rich prints to a pipe.
"""

from __future__ import annotations

import os
import re
import sys
from typing import IO, Any

_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")  # rich.markup.RE_TAGS
_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")
SGR = {"bold": "1", "dim": "2", "italic": "3", "underline": "4", "red": "31", "green": "32", "yellow": "33"}
SGR |= {"blue": "34", "magenta": "35", "cyan": "36", "white": "37"}


def escape(text: str) -> str:
    """TEXT with its square brackets escaped, so that it prints as it is (rich.markup.escape)."""
    text = _ESCAPE.sub(lambda m: f"{m.group(1)}{m.group(1)}\\{m.group(2)}", text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


def render(markup: str, color: bool) -> str:
    """MARKUP as plain text, or with ANSI styles when COLOR."""
    out: list[str] = []
    stack: list[str] = []
    pos = 0
    for m in _TAG.finditer(markup):
        out.append(markup[pos : m.start()])
        pos = m.end()
        slashes, tag = m.group(2), m.group(3)
        out.append("\\" * (len(slashes) // 2))
        if len(slashes) % 2:  # escaped: the tag is text
            out.append(f"[{tag}]")
            continue
        if tag.startswith("/"):
            if stack:
                stack.pop()
        else:
            stack.append(";".join(SGR[w] for w in tag.split() if w in SGR))
        if color:
            out.append("\x1b[0m" + "".join(f"\x1b[{s}m" for s in stack if s))
    out.append(markup[pos:])
    if color and stack:
        out.append("\x1b[0m")
    return "".join(out)


class Term:
    """print() for one stream, as rich's Console(highlight=False, soft_wrap=True) prints text."""

    def __init__(self, stream: IO[str] | None = None, stderr: bool = False) -> None:
        self._stream = stream
        self.stderr = stderr
        self._rich: Any = None

    @property
    def file(self) -> IO[str]:
        return self._stream or (sys.stderr if self.stderr else sys.stdout)

    @property
    def color(self) -> bool:
        f = self.file
        return hasattr(f, "isatty") and f.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"

    def print(
        self, obj: object = "", *, markup: bool = True, style: str | None = None, end: str = "\n", **_: Any
    ) -> None:
        """Print OBJ: text (with markup unless MARKUP is False, in STYLE), or a rich renderable (a Table)."""
        if not isinstance(obj, str):
            self.rich().print(obj, style=style, end=end)
            return
        text = render(obj, self.color) if markup else obj
        if style and self.color:
            codes = ";".join(SGR[w] for w in style.split() if w in SGR)
            text = f"\x1b[{codes}m{text}\x1b[0m"
        self.file.write(text + end)
        self.file.flush()

    def rich(self) -> Any:
        """A rich Console on the same stream (imported now: only for renderables)."""
        if self._rich is None:
            from rich.console import Console

            self._rich = Console(file=self._stream, stderr=self.stderr, highlight=False, soft_wrap=True)
        return self._rich
