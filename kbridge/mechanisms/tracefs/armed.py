"""The kprobe events of one tracefs run, as the engine's Armed probe: what both ways of arming share.

Events holds the run (its checked lines, filter, ledger records, the events defined), reads
trace_pipe from the host's stream port between its own start and end markers (trace_marker lines
carrying a token of the run), and totals what was read. Nothing is hidden: events overwritten in
the ring buffer before they were read (per_cpu/cpuN/stats overrun, "[LOST n EVENTS]" lines) are
`lost`, and kprobe_profile's nmissed is `missed`. Arming, draining and undoing are the subclasses':
stepwise.py does each tracefs file operation from the host, scripted.py runs the guest script.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from types import TracebackType

from kbridge import kprobe_events, progress
from kbridge.guest import TRACE_BUFFER_KB
from kbridge.mechanisms.engine import Totals
from kbridge.mechanisms.histogram import ReturnPairer
from kbridge.mechanisms.tracefs import guest
from kbridge.mechanisms.tracefs.collect import CpuStats, EventInfo, TracePipeParser, parse_kprobe_profile
from kbridge.mechanisms.tracefs.guest import TRACING, GuestTracingState
from kbridge.mechanisms.tracefs.steps import StepReporter
from kbridge.session import Session
from kbridge.spec import Hit
from kbridge.targets import ownership
from kbridge.targets.base import LineStream

# The ring buffer per CPU during a run when the user names none: 6.1's default (1408 KiB) overruns
# while the host reader catches up with a burst (21 % of 200 000 dd writes were lost); 16 MiB
# holds that burst. A guest with less (a Vagrant machine) gets it for the run and its own setting
# back after; kbridge's VMs boot with it.
DEFAULT_BUFFER_KB = TRACE_BUFFER_KB
MARKER_TIMEOUT_S = 60.0  # TCG on a loaded host: trace_pipe -> cat -> virtio -> host

HitAdapter = Callable[[EventInfo, Hit], Hit]


class Events(ABC):
    """kprobe events defined in the guest, as the engine's Armed probe: defined and enabled on
    enter, removed on exit (and the guest's tracefs settings restored)."""

    def __init__(
        self,
        session: Session,
        lines: list[str],
        checked: list[kprobe_events.ProbeEvent],
        parsed: list[kprobe_events.ProbeEvent],
        user_filter: str | None,
        pid: int | None,
        comm: str | None,
        buffer_kb: int | None,
        adapt: HitAdapter | None,
        steps: StepReporter | None,
        handlers: dict[str, tuple[str, ...]] | None = None,
        tid: int | None = None,
    ) -> None:
        self.session = session
        self.vm = session.target
        self.lines, self.checked, self.parsed = lines, checked, parsed
        self.user_filter, self.pid, self.comm, self.tid = user_filter, pid, comm, tid
        self.buffer_kb = buffer_kb
        self.adapt = adapt
        self.rep = steps
        self.infos = {ev.effective_event: EventInfo.from_probe(ev) for ev in parsed}
        self.parser = TracePipeParser(self.infos)
        self.counters = {info.full_name: 0 for info in self.infos.values()}
        self.returns = ReturnPairer()
        self.entries = {
            f"{ev.effective_group}/{ev.effective_event}" for ev in parsed if not ev.is_return and not ev.offset
        }
        self.token = os.urandom(4).hex()
        self.records: list[ownership.Record] = []
        self.defined: list[kprobe_events.ProbeEvent] = []
        self.reader: ownership.OwnedProcess | None = None
        self.port: LineStream | None = None
        self.stats_before: dict[str, CpuStats] = {}
        self.seen_start = False
        self.drained = False
        self.undrained = False  # the end marker never came: some events may be unread
        self.state: GuestTracingState | None = None
        self.handlers = handlers
        self.notes: list[str] = []  # said when the symbols were resolved
        self.spec_notes: list[str] = []  # what the rendering of a spec does differently from the module

    # -- arming (the subclass's) ----------------------------------------------------

    @abstractmethod
    def __enter__(self) -> Events:
        """Define, filter and enable the events, the trace_pipe reader started; undone if any step fails."""

    def _threads(self) -> list[int]:
        """The threads --pid/--tid name, for the filter: an event records the thread (common_pid)."""
        threads: list[int] = [self.tid] if self.tid else []
        if self.pid:
            threads += guest.threads_of(self.vm, self.pid)
            self.notes.append(
                f"--pid {self.pid}: its threads when the events were armed ({', '.join(map(str, threads))}): "
                "an event records the thread (common_pid), and 6.1's events have no process id"
            )
        return threads

    # -- reading --------------------------------------------------------------------

    def _handle(self, line: str) -> Hit | None:
        rec = self.parser.feed(line)
        if rec is None:
            return None
        info = self.infos[rec.event]
        self.counters[info.full_name] += 1
        hit = self.parser.hit(rec)
        if info.is_return or info.full_name in self.entries:
            self.returns.feed(hit)  # a return's duration: since its thread's hit of an entry event on that symbol
        return self.adapt(info, hit) if self.adapt is not None else hit

    def _started(self, line: str) -> bool:
        """Whether LINE comes after our start marker; lines before it are not ours (a previous,
        interrupted run may have left some in the port)."""
        if not self.seen_start and line.endswith(f"tracing_mark_write: kbridge-start-{self.token}"):
            self.seen_start = True
            return False
        return self.seen_start

    def _read_until(self, marker: str) -> Iterator[Hit]:
        """Hits up to our trace_marker line MARKER."""
        assert self.port is not None
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        while time.monotonic() < deadline:
            line = next(self.port)
            if line is None:
                continue
            if not self._started(line):
                if self.seen_start and marker == f"kbridge-start-{self.token}":
                    return  # LINE was the start marker
                continue
            if line.endswith(f"tracing_mark_write: {marker}"):
                return
            if (hit := self._handle(line)) is not None:
                yield hit
        raise TimeoutError(marker)

    def hits(self) -> Iterator[Hit | None]:
        assert self.port is not None
        while True:
            line = next(self.port)
            yield self._handle(line) if line is not None and self._started(line) else None

    @abstractmethod
    def drain(self) -> Iterator[Hit]:
        """Disable, then read up to a marker written after the last event."""

    def totals(self) -> Totals:
        self.parser.flush()
        notes: list[str] = []
        if self.undrained:
            notes.append("trace_pipe did not drain to the end marker: some events may be unread")
        after = self._stats_after()
        overrun = sum((after[c] - self.stats_before.get(c, CpuStats())).lost for c in after)
        lost = max(overrun, self.parser.lost)
        if self.parser.lost and self.parser.lost != overrun:
            notes.append(
                f"trace_pipe reported {self.parser.lost} lost events, the ring buffer stats {overrun}; counting {lost}"
            )
        if self.parser.unparsed:
            notes.append(
                f"{len(self.parser.unparsed)} trace_pipe lines did not parse, e.g. {self.parser.unparsed[0][:200]!r}"
            )
        profile = parse_kprobe_profile(self._profile())
        missed = sum(profile.get(ev.effective_event, (0, 0))[1] for ev in self.defined)
        counters = dict(self.counters)
        if lost:
            if len(self.defined) == 1:
                # hits stay exact: events read + events the ring buffer overwrote before they were read.
                (name,) = counters
                counters[name] += lost
            notes.append(
                f"{lost} events were overwritten in the ring buffer before they were read "
                "(a larger --buffer-kb keeps them)"
                + ("" if len(self.defined) == 1 else "; the per-event counts are the events read")
            )
        for note in notes:
            progress.warn(note)
        if self.rep:
            self.rep.show(
                f"{TRACING}/kprobe_profile", "EVENT, times the probe fired (before any filter), times it was missed"
            )
        streamable = None
        if self.handlers is not None:  # a spec's events: counted per handler, as the module counts
            streamable = sum(counters.values())
            counters = {h: counters.get(name, 0) for name, hs in self.handlers.items() for h in hs}
        return Totals(counters, missed=missed, dropped=lost, notes=self.spec_notes + notes, streamable=streamable)

    @abstractmethod
    def _stats_after(self) -> dict[str, CpuStats]:
        """Each CPU's ring buffer stats after the events were disabled."""

    @abstractmethod
    def _profile(self) -> str:
        """kprobe_profile after the events were disabled."""

    # -- disarming ------------------------------------------------------------------

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # After Ctrl-C mid-call the agent drops the late reply itself.
        self._teardown(completed=self.drained)

    @abstractmethod
    def _teardown(self, completed: bool) -> None:
        """Undo everything the run did; raise if COMPLETED, else warn, when some of it failed."""
