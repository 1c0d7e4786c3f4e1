"""debugfs kprobes/list: which probes the kernel has armed, where, and in which mode.

Each line is 'ADDR  TYPE  SYMBOL+0xOFF  [FLAGS]' (kernel/kprobes.c report_probe()):
TYPE k (kprobe), r (kretprobe), p (multi-probe aggregate); FLAGS any of [GONE],
[DISABLED], [OPTIMIZED] (a jump to a detour buffer), [FTRACE] (an ftrace callback).
A probe without FTRACE or OPTIMIZED is the arch's breakpoint instruction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FLAGS = re.compile(r"\[(GONE|DISABLED|OPTIMIZED|FTRACE)\]")
MODES = ("ftrace", "optimized", "breakpoint")


@dataclass(frozen=True)
class ListedProbe:
    """One kprobes/list line."""

    address: int
    kind: str  # k | r | p
    symbol: str
    offset: int
    flags: frozenset[str]
    line: str

    @property
    def mode(self) -> str:
        """ftrace, optimized or breakpoint (or gone/disabled: not armed)."""
        for flag, mode in (
            ("GONE", "gone"),
            ("DISABLED", "disabled"),
            ("FTRACE", "ftrace"),
            ("OPTIMIZED", "optimized"),
        ):
            if flag in self.flags:
                return mode
        return "breakpoint"


def parse(text: str) -> list[ListedProbe]:
    """Every line of kprobes/list."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not re.fullmatch(r"[0-9a-f]+", parts[0]):
            continue
        sym, _, off = parts[2].rpartition("+")
        if not sym:
            sym, off = parts[2], "0x0"
        try:
            offset = int(off, 16)
        except ValueError:
            sym, offset = parts[2], 0
        out.append(ListedProbe(int(parts[0], 16), parts[1], sym, offset, frozenset(_FLAGS.findall(line)), line.strip()))
    return out


def mode_of(line: str) -> str:
    """The mode a single kprobes/list line shows (ftrace, optimized, breakpoint, disabled, gone)."""
    found = parse(line)
    return found[0].mode if found else "breakpoint"


def find(text: str, symbol: str, offset: int, address: int | None = None, kinds: str = "k") -> ListedProbe | None:
    """The probe on SYMBOL+OFFSET (or at ADDRESS: x86 IBT kernels list an entry probe at +0x4)."""
    for p in parse(text):
        if p.kind in kinds and (
            (p.symbol == symbol and p.offset == offset) or (address is not None and p.address == address)
        ):
            return p
    return None
