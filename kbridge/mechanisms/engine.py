"""The one engine every mechanism runs on: arm, run the workload, read hits, stop, drain, settle.

A mechanism arms its probe and hands the engine an `Armed` probe (a context manager
that disarms on exit, whatever happened). `drive()` starts the workload, reads hits
while it runs, applies the stop rule, stops the workload, drains what is still in
flight and settles the counts: the read-take-stop loop, the stop rule, the
streamed/lost accounting and the workload's record live here and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from kbridge import kprobes_list, progress
from kbridge.errors import KbridgeError
from kbridge.mechanisms.histogram import Log2Histogram, durations_of
from kbridge.spec import Hit, ProbeSpec
from kbridge.targets import ownership
from kbridge.targets.base import ExecResult, Target
from kbridge.workload import Workload

HitSink = Callable[[Hit], None]


@dataclass(frozen=True)
class StopRule:
    """Stop after COUNT hits or DURATION seconds; otherwise when the workload ends and output drains."""

    count: int | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        if self.count is not None and (isinstance(self.count, bool) or self.count < 1):
            raise KbridgeError(f"invalid --count {self.count!r}: a number of hits, 1 or more", "e.g. --count 10")
        if self.duration is not None and not self.duration > 0:
            raise KbridgeError(f"invalid --duration {self.duration!r}: seconds, more than 0", "e.g. --duration 5")


@dataclass
class Totals:
    """What a probe counted in the kernel, read once it is drained.

    ``counters`` are exact per-handler counts; ``dropped`` is what the transport itself
    says it dropped (ring-buffer overruns, the perf buffer's lost callback), None when it
    cannot tell (printk: the difference between counted and streamed is the loss).
    """

    counters: dict[str, int]
    missed: int = 0
    dropped: int | None = None
    notes: list[str] = field(default_factory=list)
    durations: Log2Histogram | None = None
    # How many hits the stream should have carried, when that is not the counters' sum (one
    # tracefs event serves both --pre and --post, so each is counted under both handlers).
    streamable: int | None = None


class Armed(Protocol):
    """A probe one mechanism armed in a guest, as the engine drives it."""

    def hits(self) -> Iterator[Hit | None]:
        """Hits as they arrive, None when nothing came for a moment; never ends by itself."""

    def drain(self) -> Iterator[Hit]:
        """The workload is over: stop the probe's source and yield the hits still in flight."""

    def totals(self) -> Totals:
        """The exact counts, once drained."""


class WorkloadRun:
    """A workload started in the guest, owned (a kill of kbridge at any moment leaves it stopped)."""

    def __init__(self, target: Target, workload: Workload, reserved: ownership.Reservation | None = None) -> None:
        self.started = time.monotonic()
        self.proc = ownership.spawn(target, list(workload.argv), reserved=reserved)
        self._next_poll = 0.0

    @property
    def pid(self) -> int:
        """The workload's guest pid (its process group and session too)."""
        return self.proc.pid

    @property
    def result(self) -> ExecResult | None:
        return self.proc.result

    def done(self) -> bool:
        """Whether it exited (polled at most every 20 ms)."""
        if self.proc.result is None and time.monotonic() >= self._next_poll:
            self.proc.poll()
            self._next_poll = time.monotonic() + 0.02
        return self.proc.result is not None

    def stop(self) -> None:
        """Stop it (and whatever it started) if it still runs."""
        self.proc.stop()


def stopping(stop: StopRule, work: WorkloadRun, hits: int, got_output: bool) -> bool:
    """The stop rule: COUNT hits, DURATION elapsed, or the workload ended and no hit is waiting.

    Hits still in flight when the workload ends are not lost: Armed.drain() reads them.
    """
    if stop.count is not None and hits >= stop.count:
        return True
    if stop.duration is not None:
        return time.monotonic() - work.started >= stop.duration
    return not got_output and work.done()


@dataclass
class MechanismResult:
    """What one mechanism saw for one ProbeSpec and workload."""

    mechanism: str
    spec: ProbeSpec
    hits: list[Hit] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)  # exact per-handler hit counts
    missed: int = 0  # the kernel's nmissed (kmod), or kprobe_profile misses (tracefs)
    lost: int = 0  # hits counted but whose output never arrived (printk, ring buffer, perf)
    first_event_s: float | None = None  # workload start to first hit
    workload_exit: int | None = None
    workload_output: str = ""
    notes: list[str] = field(default_factory=list)
    durations: Log2Histogram | None = None  # return durations: the module's exact histogram, else from hits
    armed: dict[str, kprobes_list.ListedProbe] = field(default_factory=dict)  # "kprobe"/"kretprobe" as listed

    @property
    def total(self) -> int:
        return sum(self.counters.values())

    def take(self, hit: Hit, stop: StopRule, on_hit: HitSink | None, started: float | None) -> bool:
        """Keep HIT unless --count already has enough: the one place hits are taken."""
        if stop.count is not None and len(self.hits) >= stop.count:
            return False
        if self.first_event_s is None and started is not None:
            self.first_event_s = time.monotonic() - started
        if hit.mode is None and (listed := self.armed.get(KIND_OF.get(hit.handler, ""))) is not None:
            hit.mode = listed.mode
        self.hits.append(hit)
        if on_hit:
            on_hit(hit)
        return True

    def settle(self, totals: Totals, stop: StopRule) -> None:
        """Exact counts from TOTALS and what the stream lost: the one place `lost` is decided.

        Without --count every counted hit should have been streamed, so the difference is
        lost (or what the transport says it dropped, if larger). With --count the stream was
        cut on purpose: only what the transport itself dropped is lost.
        """
        self.counters = dict(totals.counters)
        self.missed = totals.missed
        self.notes += totals.notes
        self.durations = totals.durations
        dropped = totals.dropped or 0
        expected = self.total if totals.streamable is None else totals.streamable
        self.lost = dropped if stop.count is not None else max(dropped, expected - len(self.hits))

    def record_workload(self, work: WorkloadRun | None) -> None:
        """The workload's exit status and output, once it has ended."""
        if work is not None and work.result is not None:
            self.workload_exit = work.result.exitcode
            self.workload_output = (work.result.stdout + work.result.stderr).decode(errors="replace")

    def summary(self) -> dict:
        """The JSON summary entry every mechanism reports: exact hits, then what the stream saw."""
        entry: dict = {
            "hits": self.total,
            "counters": self.counters,
            "streamed": len(self.hits),
            "missed": self.missed,
            "lost": self.lost,
        }
        if self.first_event_s is not None:
            entry["first_event_s"] = round(self.first_event_s, 6)
        if self.armed:
            entry["armed"] = {kind: {"mode": p.mode, "kprobes_list": p.line} for kind, p in self.armed.items()}
        if self.notes:
            entry["notes"] = self.notes
        if (hist := self.durations or durations_of(self.hits)) is not None:
            entry["durations"] = hist.to_json()
        return entry


KPROBES_LIST = "/sys/kernel/debug/kprobes/list"
KIND_OF = {"pre": "kprobe", "post": "kprobe", "fault": "kprobe", "entry": "kretprobe", "ret": "kretprobe"}


MODE_TEXT = {
    "breakpoint": lambda arch: (
        f"a breakpoint, {arch.breakpoint_name}: a trap, then the instruction {arch.insn_after_trap}"
    ),
    "ftrace": lambda arch: "an ftrace callback: no trap and no single-step",
    "optimized": lambda arch: "an optimized jump to a detour buffer: no trap",
}


def armed_as(target: Target, spec: ProbeSpec, text: str | None = None) -> dict[str, kprobes_list.ListedProbe]:
    """How the kernel armed SPEC's probes, read from kprobes/list while they are armed (TEXT: as the
    mechanism read it when arming): an int3/BRK breakpoint, an ftrace callback or an optimized jump
    (what the per-hit text must say)."""
    try:
        listed = kprobes_list.parse(
            text if text is not None else target.read_file(KPROBES_LIST).decode(errors="replace")
        )
    except KbridgeError:
        return {}
    out = {}
    for kind, letter in (("kprobe", "k"), ("kretprobe", "r")):
        mine = [p for p in listed if p.kind == letter and p.symbol == spec.symbol]
        # An exact offset first; x86 IBT kernels list an entry probe at +0x4 (past endbr64).
        best = next((p for p in mine if p.offset == spec.offset), mine[0] if mine else None)
        if best is not None and best.mode in kprobes_list.MODES:
            out[kind] = best
    return out


def drive(
    name: str,
    target: Target,
    spec: ProbeSpec,
    workload: Workload,
    stop: StopRule,
    on_hit: HitSink | None,
    armed: AbstractContextManager[Armed],
    notes: list[str] | None = None,
) -> MechanismResult:
    """Run WORKLOAD under the probe ARMED arms and collect every hit, for mechanism NAME.

    Arming happens when ARMED is entered (a refusal raises before the workload starts);
    disarming when it exits, on every path. The workload is stopped before the drain,
    and on any error.
    """
    result = MechanismResult(name, spec, notes=list(notes or ()))
    work: WorkloadRun | None = None
    # The workload's record goes to the ledger with the arming's: no ledger write while the probe counts.
    reserved: ownership.Reservation | None = ownership.reserve(target)
    try:
        with armed as probe:
            # A mechanism that read kprobes/list while arming says so (`listed`): no second read.
            result.armed = armed_as(target, spec, getattr(probe, "listed", None))
            for kind, listed in result.armed.items():
                progress.info(
                    f"{kind} on {listed.symbol}+{listed.offset:#x} armed as {MODE_TEXT[listed.mode](target.arch)} "
                    f"(kprobes/list: {listed.line})"
                )
            work = WorkloadRun(target, workload, reserved)
            reserved = None  # the workload owns its record now
            try:
                for hit in probe.hits():
                    if hit is not None:
                        result.take(hit, stop, on_hit, work.started)
                    if stopping(stop, work, len(result.hits), hit is not None):
                        break
            finally:
                work.stop()
            for hit in probe.drain():
                result.take(hit, stop, on_hit, None)
            result.settle(probe.totals(), stop)
    finally:
        if reserved is not None:
            ownership.unreserve(target, reserved)
    result.record_workload(work)
    return result
