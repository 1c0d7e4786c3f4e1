"""The guest's tracefs, file by file: what a run reads and writes, and how a refusal is explained.

define() appends to kprobe_events and turns a rejection into the kernel's own error_log
verdict and caret; set_filter() likewise for event filters; GuestTracingState is what a
run may change and must restore. Every helper takes the Target: the tracefs mechanism
and the labs drive tracefs through these functions.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kbridge import kprobe_events
from kbridge.errors import KbridgeError
from kbridge.kprobe_events import Grammar
from kbridge.mechanisms.tracefs import render
from kbridge.mechanisms.tracefs.collect import CpuStats, parse_cpu_stats
from kbridge.mechanisms.tracefs.steps import StepReporter, shell_quote
from kbridge.targets.base import GuestIOError, Target

TRACING = "/sys/kernel/tracing"
KPROBE_EVENTS = f"{TRACING}/kprobe_events"
_COMM = re.compile(r"[\x21-\x7e]{1,15}")


@dataclass
class GuestTracingState:
    """What a run may change in the guest's tracefs, read before it starts."""

    kprobe_events: str
    buffer_size_kb: int
    tracing_on: str

    @classmethod
    def read(cls, vm: Target) -> GuestTracingState:
        size = vm.read_file(f"{TRACING}/buffer_size_kb").decode()
        # "7 (expanded: 1408)": the boot-time buffer is tiny until tracing is
        # first used, then grows to the expanded size; that is the one to restore.
        m = re.search(r"expanded:\s*(\d+)", size)
        return cls(
            vm.read_file(KPROBE_EVENTS).decode(),
            int(m.group(1) if m else size.split()[0]),
            vm.read_file(f"{TRACING}/tracing_on").decode().strip(),
        )


def build_filter(
    user: str | None = None,
    threads: Sequence[int] = (),
    comm: str | None = None,
    exclude: Sequence[int] = (),
) -> str:
    """One event filter: the user's expression, the threads of --pid (or the one of --tid), --comm,
    and never kbridge's own helpers.

    An event records common_pid, the thread: 6.1 has no tgid field, so a process is matched by
    the thread ids it has (kbridge lists them when the events are armed).
    """
    parts = []
    if user is not None and user.strip():
        if "\n" in user or "\0" in user:
            raise KbridgeError(f"invalid --filter {user!r}: one line only")
        parts.append(f"({user.strip()})")
    for t in threads:
        if t <= 0:
            raise KbridgeError(f"invalid thread id {t}")
    if threads:
        parts.append("(" + " || ".join(f"common_pid == {t}" for t in sorted(set(threads))) + ")")
    if comm is not None:
        if not _COMM.fullmatch(comm) or any(c in comm for c in '"\\'):
            raise KbridgeError(
                f"invalid --comm {comm!r}: 1-15 printable characters without spaces, quotes or backslashes"
            )
        parts.append(f'comm == "{comm}"')
    parts += [f"common_pid != {p}" for p in exclude]
    return " && ".join(parts)


# --- guest tracefs helpers -----------------------------------------------------


def threads_of(vm: Target, pid: int) -> list[int]:
    """The thread ids of guest process PID now (its /proc/PID/task), or a one-line error."""
    res = vm.run(["/bin/busybox", "ls", f"/proc/{pid}/task"], timeout=30)
    tids = [int(t) for t in res.text.split() if t.isdigit()]
    if not res.ok or not tids:
        raise KbridgeError(f"--pid {pid}: no such process in the guest", "kbridge vm exec -- ps lists them")
    return tids


def existing_events(text: str, grammar: Grammar) -> dict[str, str]:
    """GROUP/EVENT -> line, for what kprobe_events lists now (in GRAMMAR: 6.6+ lists BTF names)."""
    out = {}
    for line in text.splitlines():
        with contextlib.suppress(KbridgeError):
            ev = kprobe_events.parse(line, grammar)
            if isinstance(ev, kprobe_events.ProbeEvent):
                out[f"{ev.effective_group}/{ev.effective_event}"] = line
    return out


def event_dir(ev: kprobe_events.ProbeEvent) -> str:
    return f"{TRACING}/events/{ev.effective_group}/{ev.effective_event}"


def error_log(vm: Target) -> list[kprobe_events.ErrorLogEntry]:
    with contextlib.suppress(GuestIOError):
        return kprobe_events.parse_error_log(vm.read_file(f"{TRACING}/error_log").decode(errors="replace"))
    return []


def _new_entries(
    before: list[kprobe_events.ErrorLogEntry], after: list[kprobe_events.ErrorLogEntry]
) -> list[kprobe_events.ErrorLogEntry]:
    seen = set(before)
    return [e for e in after if e not in seen]


def map_position(line: str, kernel_position: int) -> int:
    """A caret column in the kernel's re-joined command mapped back onto LINE."""
    words = [(m.start(), m.group()) for m in re.finditer(r"\S+", line.split("#", 1)[0])]
    joined = 0
    for start, word in words:
        if kernel_position <= joined + len(word):
            return start + kernel_position - joined
        joined += len(word) + 1
    return len(line)


def define(vm: Target, line: str, steps: StepReporter | None = None) -> None:
    """Append LINE to kprobe_events; a rejection is reported with error_log's verdict and caret."""
    before = error_log(vm)
    try:
        vm.write_file(KPROBE_EVENTS, (line + "\n").encode(), mode="a")
    except GuestIOError as e:
        if steps:
            steps.failed(f"echo {shell_quote(line)} >> kprobe_events")
        raise rejected_line(line, before, error_log(vm), str(e)) from None


def rejected_line(
    line: str, before: list[kprobe_events.ErrorLogEntry], after: list[kprobe_events.ErrorLogEntry], failure: str
) -> KbridgeError:
    """The error for LINE, which kprobe_events refused (FAILURE: the write's own error): error_log's
    verdict and caret from the entries that appeared between BEFORE and AFTER."""
    why = failure.rsplit(":", 1)[-1].strip()
    new = [x for x in _new_entries(before, after) if x.subsystem == "trace_kprobe"]
    if not new:
        return KbridgeError(
            f"the guest kernel rejected {line!r}: {why} (nothing in error_log)",
            "see Documentation/trace/kprobetrace.rst",
        )
    entry = new[-1]
    return kprobe_events.EventSyntaxError(
        line, entry.error_class, entry.error, map_position(line, entry.position), entry.command, entry.position
    )


def remove(vm: Target, ev: kprobe_events.ProbeEvent) -> None:
    vm.write_file(KPROBE_EVENTS, (render.removal_line(ev) + "\n").encode(), mode="a")


def set_filter(
    vm: Target, ev: kprobe_events.ProbeEvent, text: str, steps: StepReporter | None = None, note: str = ""
) -> None:
    """Write an event filter; a parse error is reported with the kernel's message and caret."""
    if not text:
        return
    path = f"{event_dir(ev)}/filter"
    before = error_log(vm)
    try:
        vm.write_file(path, text.encode())
        if steps:
            steps.wrote(path, text, note=note)
    except GuestIOError:
        if steps:
            steps.failed(f"echo {shell_quote(text)} > {path}")
        after = error_log(vm)
        shown = "" if _new_entries(before, after) else vm.read_file(path).decode(errors="replace")
        raise rejected_filter(ev, before, after, shown) from None


def rejected_filter(
    ev: kprobe_events.ProbeEvent,
    before: list[kprobe_events.ErrorLogEntry],
    after: list[kprobe_events.ErrorLogEntry],
    filter_file: str,
) -> KbridgeError:
    """The error for a filter the kernel refused: its error_log entry, else what the filter file says."""
    new = _new_entries(before, after)
    detail = str(new[-1]).rstrip() if new else filter_file.rstrip()
    return KbridgeError(
        f"the guest kernel rejected the filter for {ev.effective_group}/{ev.effective_event}:\n{detail}",
        "filters use the event's field names (see its format file), e.g. --filter 'fd == 1'",
    )


def read_stats(vm: Target) -> dict[str, CpuStats]:
    """per_cpu/cpuN/stats for every CPU the guest has."""
    out = {}
    # tracefs has a per_cpu/cpuN for each possible CPU (for_each_tracing_cpu): read that
    # list, a file, rather than start ls in the guest.
    for n in parse_cpu_list(vm.read_file("/sys/devices/system/cpu/possible").decode()):
        with contextlib.suppress(GuestIOError):
            out[f"cpu{n}"] = parse_cpu_stats(vm.read_file(f"{TRACING}/per_cpu/cpu{n}/stats").decode())
    return out


def parse_cpu_list(text: str) -> list[int]:
    """A kernel CPU list ('0', '0-3', '0,2-5') as CPU numbers."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            cpus.extend(range(int(lo), int(hi if hi.isdigit() else lo) + 1))
    return cpus


def enable(vm: Target, ev: kprobe_events.ProbeEvent, on: bool, steps: StepReporter | None = None) -> None:
    """Write 1 or 0 to the event's enable file."""
    vm.write_file(f"{event_dir(ev)}/enable", b"1" if on else b"0")
    if steps:
        steps.wrote(f"{event_dir(ev)}/enable", "1" if on else "0")
