"""Kernel crash reports in a kernel log: where one starts, where it ends, and the frame it blames.

A report starts at a line with one of OOPS_MARKERS, or at a bug checker's first line
(kbridge.sanitizers: KASAN, KFENCE, UBSAN, lockdep, sleeping in atomic context), and runs to
the kernel's "---[ end trace ... ]---" line, the checker's own end (or until the log goes
quiet). The faulting frame is the RIP (x86_64) or pc (arm64) line: FUNCTION+0xOFF/0xSIZE,
with [MODULE] when the function is in a loaded module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from kbridge import sanitizers

OOPS_MARKERS = (
    "Oops",
    "BUG: ",
    "Kernel panic",
    "general protection fault",
    "invalid opcode: ",  # x86 die() for #UD, as "Oops" for a page fault: "invalid opcode: 0000 [#1]"
    "Unable to handle kernel",
    "Internal error:",
    # 32-bit arm's do_DataAbort() names a fault it has no handler for (a kernel store to a user
    # address closed by its domain, 6.1 armmp) on the line before die()'s "Internal error:".
    "Unhandled fault: ",
    "WARNING: CPU:",
    "rcu: INFO: rcu_sched detected stalls",
    "rcu: INFO: rcu_preempt detected stalls",
)
# A WARN_ON prints "WARNING: CPU:" and carries on; the others leave the kernel in a state
# nothing should be trusted after (the faulting task was killed holding what it held).
CRASH_MARKERS = tuple(m for m in OOPS_MARKERS if not m.startswith("WARNING"))
END = re.compile(r"---\[ end (trace|Kernel panic)")
# "RIP: 0010:kbring_ioctl+0x3f/0xd0 [kbring]" (x86_64), "pc : handler_pre+0x1c/0x48 [kprobe_lab]" (arm64),
# and the same FUNC+0xOFF/0xSIZE [MOD] form in call traces.
SITE = re.compile(r"(?P<func>[A-Za-z_][\w.]*)\+0x(?P<off>[0-9a-f]+)/0x(?P<size>[0-9a-f]+)(?: \[(?P<mod>\w+)\])?")
# The same lines with or without the printk timestamp ("[    8.713119] ").
_STAMP = r"^(?:\[\s*\d+\.\d+\]\s?)?\s*"
_FAULT_LINE = re.compile(_STAMP + r"(RIP: [0-9a-f]{4}:|pc : |PC is at )")
_CALLER_LINE = re.compile(_STAMP + r"(lr : |LR is at )")
_TRACE_START = re.compile(_STAMP + r"Call [Tt]race:")
# 32-bit arm (6.1) prints no header: its backtrace is lines of "kbring_ioctl [kbring] from sys_ioctl+0x134/0xc78".
_ARM_FRAME = re.compile(_STAMP + r"[A-Za-z_][\w.]*(?: \[\w+\])? from [A-Za-z_][\w.]*\+0x")


def head(text: str, frames: int = 6) -> list[str]:
    """What a reader needs of report TEXT at once: its first lines (the BUG/WARN line and what the
    kernel says of the access), the faulting RIP/pc line (and arm64's lr, arm's "LR is at"), and the
    start of the call trace: on arm64 the pc line comes after a dozen lines of abort decoding."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if is_oops(ln)), 0)
    if lines and sanitizers.kind(lines[start]) is not None:
        return sanitizers.head(text, frames)
    keep = set(range(start, min(start + 4, len(lines))))
    for i, line in enumerate(lines):
        if _FAULT_LINE.match(line) or _CALLER_LINE.match(line):
            keep.add(i)
        elif _TRACE_START.match(line):
            keep.update(range(i, min(i + 1 + frames, len(lines))))
            break
        elif _ARM_FRAME.match(line):
            arm_frames = [j for j in range(i, min(i + frames, len(lines))) if _ARM_FRAME.match(lines[j])]
            keep.update(arm_frames)
            break
    return [lines[i] for i in sorted(keep)]


def is_oops(text: str) -> bool:
    """Whether a log line starts (or is part of the head of) a crash report or a bug checker's report."""
    return any(m in text for m in OOPS_MARKERS) or sanitizers.kind(text) is not None


def is_crash(text: str) -> bool:
    """Like is_oops, but a WARN or a bug checker's report (the kernel carries on) does not count."""
    return any(m in text for m in CRASH_MARKERS) and sanitizers.kind(text) is None


@dataclass(frozen=True)
class Site:
    """The frame a report blames: FUNCTION+OFFSET, in MODULE (None: the kernel itself)."""

    function: str
    offset: int
    size: int
    module: str | None

    def __str__(self) -> str:
        return f"{self.function}+{self.offset:#x}/{self.size:#x}" + (f" [{self.module}]" if self.module else "")


def faulting_site(text: str) -> Site | None:
    """The RIP/pc line's frame of a report, else the first frame of its call trace."""
    lines = text.splitlines()
    ordered = [ln for ln in lines if _FAULT_LINE.match(ln)] + lines
    for line in ordered:
        if m := SITE.search(line):
            return Site(m["func"], int(m["off"], 16), int(m["size"], 16), m["mod"])
    return None


def module_sites(text: str, module: str) -> list[Site]:
    """Every frame of MODULE in a report, in order (the faulting one first when it is MODULE's)."""
    out = []
    for m in SITE.finditer(text):
        if m["mod"] == module:
            out.append(Site(m["func"], int(m["off"], 16), int(m["size"], 16), m["mod"]))
    return out


class _Texts(Protocol):
    def __next__(self) -> str | None: ...


def collect(first: str, more: _Texts | Iterator[str | None], quiet_s: float = 1.0, limit_s: float = 5.0) -> str:
    """A whole report: FIRST, then lines from MORE up to the end marker, or QUIET_S of silence."""
    lines = [first]
    deadline = time.monotonic() + limit_s
    last = time.monotonic()
    while time.monotonic() < deadline and not END.search(lines[-1]):
        try:
            text = next(more)
        except (StopIteration, Exception):  # noqa: BLE001 - the guest may be gone: keep what came
            break
        if text is None:
            if time.monotonic() - last > quiet_s:
                break
            continue
        last = time.monotonic()
        lines.append(text)
    return "\n".join(lines)
