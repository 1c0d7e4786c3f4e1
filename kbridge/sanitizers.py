"""The kernel's bug checkers' reports in a kernel log: which checker spoke, and where its report ends.

A debug kernel (`--kernel debug`: KASAN, KFENCE, UBSAN, lockdep, DEBUG_ATOMIC_SLEEP) reports a
bug it caught and carries on, unlike an oops: kbridge fails the command that caused it and shows
the report, without taking the kernel for dead. Debian's own kernels report some of these too
(KFENCE, "sleeping function called from invalid context").

The first lines are the kernel's own (6.1; later kernels' variants where they differ):

    BUG: KASAN: use-after-free in kbdebug_uaf.isra.0+0xa2/0xd0 [kbdebug]      (6.4+: slab-use-after-free)
    BUG: KFENCE: use-after-free read in kbdebug_kfence.isra.0+0xca/0x130 [kbdebug]
    UBSAN: array-index-out-of-bounds in /home/me/drv/kbdebug.c:114:14
    WARNING: possible circular locking dependency detected                    (lockdep)
    BUG: sleeping function called from invalid context at include/linux/sched/mm.h:274
    BUG: scheduling while atomic: sh/96/0x00000002

KASAN, KFENCE and UBSAN close their report with a line of '='; lockdep and the atomic-context
checks end with their stack trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (kind, first line). Order matters only where one line could match two.
_STARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("KASAN", re.compile(r"BUG: KASAN: ")),
    ("KFENCE", re.compile(r"BUG: KFENCE: ")),
    ("UBSAN", re.compile(r"UBSAN: [\w-]+ in ")),
    (
        "lockdep",
        re.compile(
            r"WARNING: (possible circular locking dependency detected|possible recursive locking detected|"
            r"inconsistent lock state|possible irq lock inversion dependency detected|bad unlock balance detected|"
            r"held lock freed|lock held when returning to user space|suspicious RCU usage|"
            r"Nested lock was not taken|lock held at task exit time)"
        ),
    ),
    ("lockdep", re.compile(r"BUG: (Invalid wait context|held lock freed!|workqueue leaked lock)")),
    ("atomic-sleep", re.compile(r"BUG: (sleeping function called from invalid context|scheduling while atomic)")),
)
# A console line's printk timestamp ("[   11.239883] ").
_STAMP = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_RULE = re.compile(r"^={20,}\s*$")
# A stack frame line: " func+0x21/0x40 [mod]", " ? func+0x..", " <TASK>", " </TASK>".
_FRAME = re.compile(
    r"^\s+(\? )?[A-Za-z_.][\w.]*\+0x[0-9a-f]+/0x[0-9a-f]+( \[\w+\])?\s*$|^\s*</?(TASK|IRQ|NMI|SOFTIRQ)>\s*$"
)
_TRACE_START = re.compile(r"^\s*Call [Tt]race:")
_CLOSED_BY_RULE = ("KASAN", "KFENCE", "UBSAN")
# Reports after which the kernel's checker is off or the kernel's state is broken: the VM is
# restarted before the next command. lockdep turns itself off after its first report (debug_locks_off(),
# "INFO: lockdep is turned off." in later ones); "scheduling while atomic" leaves the preempt count
# wrong, so reports follow on the way back to user space and an arm64 guest was seen to wedge.
_RESTART = {
    "lockdep": "lockdep turns itself off after its first report",
    "scheduling while atomic": "the task slept holding a lock or with preemption off: the preempt count is left wrong",
}


def strip_stamp(line: str) -> str:
    """LINE without a console timestamp."""
    return _STAMP.sub("", line)


def kind(line: str) -> str | None:
    """Which checker's report LINE starts (KASAN, KFENCE, UBSAN, lockdep, atomic-sleep), else None."""
    text = strip_stamp(line).strip()
    for name, pattern in _STARTS:
        if pattern.match(text):
            return name
    return None


def end_of(lines: list[str], start: int, limit: int = 300) -> int | None:
    """The index of the last line of the report starting at LINES[START], or None while it is not
    complete (the kernel is still printing it): KASAN, KFENCE and UBSAN close with a '=' rule; the
    others end with their stack trace (at </TASK> on x86_64, the last frame on arm64)."""
    what = kind(lines[start])
    stop = min(len(lines), start + limit)
    in_trace = False
    framed = False
    for i in range(start + 1, stop):
        text = strip_stamp(lines[i])
        if what in _CLOSED_BY_RULE:
            if _RULE.match(text):
                return i
            continue
        if _TRACE_START.match(text):
            in_trace = True
            continue
        if in_trace:
            if re.match(r"^\s*</TASK>", text):
                return i
            if _FRAME.match(text):
                framed = True
                continue
            if framed and not re.match(r"^\s*(RIP|RSP|RAX|RDX|RBP|R\d+|Code):", text):
                return i - 1
    if stop < len(lines):
        return stop - 1  # a report that never closed: as much as a reader needs
    return None


def restarts(report: str) -> str | None:
    """Why the kernel that printed REPORT should not be reused (lockdep is off after a report, or
    the task's state is broken), else None: a KASAN, KFENCE or UBSAN report leaves both working
    (kbridge boots its debug kernel with kasan_multi_shot)."""
    for line in report.splitlines():
        what = kind(line)
        if what == "lockdep":
            return _RESTART["lockdep"]
        if what == "atomic-sleep" and "scheduling while atomic" in line:
            return _RESTART["scheduling while atomic"]
    return None


@dataclass(frozen=True)
class Located:
    """Where a report points: the function+offset it names (and its module), or a source file:line."""

    function: str | None = None
    offset: int | None = None
    size: int | None = None
    module: str | None = None
    file: str | None = None
    line: int | None = None


_SITE = re.compile(r"(?P<func>[A-Za-z_][\w.]*)\+0x(?P<off>[0-9a-f]+)/0x(?P<size>[0-9a-f]+)(?: \[(?P<mod>\w+)\])?")
_FILE_LINE = re.compile(r" (?:in|at) (?P<file>\S+?):(?P<line>\d+)(?::\d+)?\s*$")


def title_location(first: str) -> Located | None:
    """What a report's first line names: KASAN/KFENCE 'in FUNC+0xOFF/0xSIZE [MOD]', UBSAN 'in FILE:LINE:COL',
    atomic-sleep 'at FILE:LINE' (the might_sleep() call site, often a kernel header)."""
    text = strip_stamp(first)
    if m := _SITE.search(text):
        return Located(m["func"], int(m["off"], 16), int(m["size"], 16), m["mod"])
    if m := _FILE_LINE.search(text):
        return Located(file=m["file"], line=int(m["line"]))
    return None


def module_frames(report: str) -> list[Located]:
    """The frames of loaded modules in REPORT, in order, skipping the unreliable '? ' ones of x86
    traces (stale return addresses the unwinder found on the stack)."""
    out = []
    for line in report.splitlines():
        text = strip_stamp(line)
        if re.match(r"^\s+\? ", text):
            continue
        for m in _SITE.finditer(text):
            if m["mod"]:
                out.append(Located(m["func"], int(m["off"], 16), int(m["size"], 16), m["mod"]))
    return out


# The checkers' own frames at the top of their stack traces: not where the bug is.
_CHECKER_FRAMES = re.compile(
    r"^(dump_stack|dump_backtrace|show_stack|print_report|kasan_|__kasan|__asan_|kfence_|__kfence|ubsan_|"
    r"__ubsan_handle|__might_resched|__might_sleep|__might_fault|__schedule_bug|__schedule|schedule|"
    r"check_noncircular|check_prev_add|validate_chain|print_circular_bug|__lock_acquire|lock_acquire|"
    r"__mutex_lock|mutex_lock_nested|_raw_spin_lock|__cant_|lockdep_|report_|__kmem_cache_alloc|"
    r"kmalloc_trace|__kmalloc|slab_pre_alloc_hook|might_alloc)"
)


def head(text: str, frames: int = 6) -> list[str]:
    """What a reader needs of a checker's report TEXT at once: its first lines (what was caught: the
    access, the locks), the locks lockdep names, and the first FRAMES reliable frames of the stack
    trace below the checker's own."""
    lines = [ln for ln in text.splitlines() if strip_stamp(ln).strip()]
    start = next((i for i, ln in enumerate(lines) if kind(ln) is not None), 0)
    keep = set(range(start, min(start + 3, len(lines))))
    shown = 0
    # KFENCE prints the faulting stack right after its access line, without a "Call Trace:" header.
    kfence = bool(lines) and kind(lines[start]) == "KFENCE"
    in_trace = top = kfence
    for i, line in enumerate(lines[start:], start):
        body = strip_stamp(line)
        if kfence and shown and not _FRAME.match(body):
            break  # the end of its stack: what follows is where the object was allocated and freed
        if re.search(r"is trying to acquire lock:|but task is already holding lock:", body):
            keep.update((i, i + 1))
        elif _TRACE_START.match(body):
            keep.add(i)
            in_trace = top = True
        elif in_trace and (m := re.match(r"^\s+([A-Za-z_.][\w.]*)\+0x", body)):
            if top and _CHECKER_FRAMES.match(m[1]):
                continue
            top = False
            keep.add(i)
            shown += 1
            if shown >= frames:
                break
    return [lines[i] for i in sorted(k for k in keep if k < len(lines))]
