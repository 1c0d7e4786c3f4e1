"""kbridge.cli.term prints rich's markup as rich does, without importing rich on the way to the first hit."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.markup import escape as rich_escape

from kbridge.cli.output import hit_line
from kbridge.cli.term import Term, escape, render
from kbridge.spec import Hit

HIT = Hit("kmod", "ksys_write", "pre", 146, "sh [x]", 0, {"fd": 1}, timestamp=9.802903, addr=0x10, ip=0x11, flags=0x202)
SAMPLES = [
    hit_line(HIT),
    "[bold red]error:[/] " + rich_escape("invalid --comm 'a[b]' \\ and [dim] too"),
    "[yellow]! " + rich_escape("p:x ksys_write a=[1]") + "[/]",
    "[dim]hint: " + rich_escape("ends with a backslash \\") + "[/]",
    "a \\[dim] b [cyan]c[/cyan] d",
    "[green]✓[/] done",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_plain_text_as_rich_prints_it(text: str) -> None:
    f = io.StringIO()
    Console(file=f, highlight=False, soft_wrap=True, color_system=None, emoji=False).print(text)
    assert render(text, color=False) + "\n" == f.getvalue()


@pytest.mark.parametrize("text", ["a[b]", "x[dim]", "\\", "a\\[dim]", "[/] y", "plain"])
def test_escape_is_riches(text: str) -> None:
    assert escape(text) == rich_escape(text)


def test_colour_only_on_a_terminal() -> None:
    assert render("[bold red]x[/] y", color=True) == "\x1b[0m\x1b[1;31mx\x1b[0m y"
    out = io.StringIO()
    Term(out).print("[dim]a[/]", style="bold")
    assert out.getvalue() == "a\n"  # a pipe: no escape codes at all


def test_a_table_is_drawn_by_rich() -> None:
    from rich.table import Table

    out = io.StringIO()
    t = Table("a")
    t.add_row("1")
    Term(out).print(t)
    assert out.getvalue() == "┏━━━┓\n┃ a ┃\n┡━━━┩\n│ 1 │\n└───┘\n"
