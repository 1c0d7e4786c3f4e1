"""One source per lab: the reference solution, with numbered TODO blocks the skeleton leaves out.

As linux-kernel-labs' tools/labs does with its templates, a block is

    /* TODO 2: what the student writes here */      (or "# TODO 2: ..." in shell and answer files)
    ...the reference lines...
    //@ a line only the skeleton has (a placeholder that keeps it compiling)
    /* END TODO 2 */

The skeleton keeps the TODO line and the `//@`/`#@` lines (without the marker) and drops
the reference lines; the solution keeps the TODO line and the reference lines. The END
line is in neither. Both are derived on the fly, so they never drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kbridge.errors import KbridgeError

_OPEN = re.compile(r"^\s*(?:/\*|//|#)\s*TODO (\d+):")
_CLOSE = re.compile(r"^\s*(?:/\*|//|#)\s*END TODO (\d+)\b")
_SKELETON_ONLY = re.compile(r"^(\s*)(?://@|#@) ?(.*)$")


@dataclass(frozen=True)
class Todo:
    """One TODO block: its number, the first line of its text, and where it starts (1-based)."""

    number: int
    text: str
    line: int


def _split(source: str, name: str) -> list[tuple[str, int | None, str]]:
    """(kind, todo number, line) for every line: kind is 'plain', 'todo', 'ref', 'skel' or 'end'."""
    out: list[tuple[str, int | None, str]] = []
    current: int | None = None
    header = ""  # the TODO's comment goes on: "c" until its "*/", "sh" while lines start with "#"
    seen: set[int] = set()
    for n, line in enumerate(source.splitlines(), 1):
        if header == "c" or (
            header == "sh"
            and line.lstrip().startswith("#")
            and not _CLOSE.match(line)
            and not _SKELETON_ONLY.match(line)
        ):
            out.append(("todo", current, line))
            if header == "c" and "*/" in line:
                header = ""
            continue
        header = ""
        if m := _OPEN.match(line):
            if current is not None:
                raise KbridgeError(f"{name}:{n}: TODO {m[1]} opens inside TODO {current}")
            current = int(m[1])
            if current in seen:
                raise KbridgeError(f"{name}:{n}: TODO {current} appears twice")
            seen.add(current)
            out.append(("todo", current, line))
            if line.lstrip().startswith("/*") and "*/" not in line:
                header = "c"
            elif line.lstrip().startswith("#"):
                header = "sh"
        elif m := _CLOSE.match(line):
            if current is None or int(m[1]) != current:
                raise KbridgeError(f"{name}:{n}: END TODO {m[1]} does not close an open TODO")
            out.append(("end", current, line))
            current = None
        elif current is not None and _SKELETON_ONLY.match(line):
            out.append(("skel", current, line))
        else:
            out.append(("ref" if current is not None else "plain", current, line))
    if current is not None:
        raise KbridgeError(f"{name}: TODO {current} is never closed (END TODO {current})")
    return out


def todos(source: str, name: str = "source") -> list[Todo]:
    """The TODO blocks of SOURCE, in order."""
    result = []
    for n, (kind, num, line) in enumerate(_split(source, name), 1):
        if kind == "todo" and num is not None and _OPEN.match(line):
            text = _OPEN.sub("", line).strip().removesuffix("*/").strip()
            result.append(Todo(num, text, n))
    return result


def skeleton(source: str, name: str = "source") -> str:
    """What the student starts from: TODO lines and placeholders, no reference lines."""
    lines = []
    for kind, _, line in _split(source, name):
        if kind in ("plain", "todo"):
            lines.append(line)
        elif kind == "skel":
            m = _SKELETON_ONLY.match(line)
            assert m is not None
            lines.append(m[1] + m[2])
    return "\n".join(lines) + "\n"


def solution(source: str, name: str = "source") -> str:
    """The reference solution: TODO lines kept as signposts, reference lines, no placeholders."""
    return "\n".join(line for kind, _, line in _split(source, name) if kind in ("plain", "todo", "ref")) + "\n"
