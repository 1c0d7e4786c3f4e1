"""What every mechanism shares: when to stop, what a run produced, the workload in the guest."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kbridge import ownership
from kbridge.collect.histogram import Log2Histogram, durations_of
from kbridge.spec import Hit, ProbeSpec
from kbridge.targets.base import ExecResult, Target
from kbridge.workload import Workload

HitSink = Callable[[Hit], None]


@dataclass(frozen=True)
class StopRule:
    """Stop after COUNT hits or DURATION seconds; otherwise when the workload ends and output drains."""

    count: int | None = None
    duration: float | None = None
    drain_s: float = 0.3  # quiet time after the workload ends before stopping


class Stopper:
    """Applies a StopRule while a collector reads: call done() after each read."""

    def __init__(self, stop: StopRule, work: WorkloadRun, drain_s: float | None = None) -> None:
        self.stop = stop
        self.work = work
        self.drain_s = stop.drain_s if drain_s is None else drain_s
        self.quiet_since: float | None = None

    def done(self, hits: int, got_output: bool) -> bool:
        """Whether to stop: COUNT hits, DURATION elapsed, or the workload ended and output went quiet."""
        now = time.monotonic()
        if got_output:
            self.quiet_since = None
        if self.stop.count is not None and hits >= self.stop.count:
            return True
        if self.stop.duration is not None:
            return now - self.work.started >= self.stop.duration
        if self.work.done():
            self.quiet_since = self.quiet_since or now
            return not got_output and now - self.quiet_since >= self.drain_s
        return False


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

    @property
    def total(self) -> int:
        return sum(self.counters.values())

    def take(self, hit: Hit, stop: StopRule, on_hit: HitSink | None, work: WorkloadRun | None) -> bool:
        """Keep HIT unless --count already has enough; the one place hits are taken."""
        if stop.count is not None and len(self.hits) >= stop.count:
            return False
        if self.first_event_s is None and work is not None:
            self.first_event_s = time.monotonic() - work.started
        self.hits.append(hit)
        if on_hit:
            on_hit(hit)
        return True

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
        if self.notes:
            entry["notes"] = self.notes
        if (hist := self.durations or durations_of(self.hits)) is not None:
            entry["durations"] = hist.to_json()
        return entry


class WorkloadRun:
    """A workload started in the guest; stopped with kill if still running when we are done."""

    def __init__(self, target: Target, workload: Workload) -> None:
        self.target = target
        self.started = time.monotonic()
        self.handle = target.spawn(list(workload.argv))
        self.result: ExecResult | None = None
        self._next_poll = 0.0
        # Recorded before anything else happens: a kbridge killed at its first hit must not
        # leave a workload running that the next command cannot find (it would count its hits).
        self._record: ownership.Record | None = ownership.claim_process(target, self.pid)

    @property
    def pid(self) -> int:
        """The workload's guest pid."""
        return self.target.guest_pid(self.handle)

    def done(self) -> bool:
        """Whether it exited (polled at most every 20 ms)."""
        if self.result is None and time.monotonic() >= self._next_poll:
            self.result = self.target.poll(self.handle)
            self._next_poll = time.monotonic() + 0.02
            if self.result is not None:
                self._forget()
        return self.result is not None

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for it to exit on its own."""
        if self.result is None:
            self.result = self.target.wait(self.handle, timeout)
            self._forget()
        return self.result

    def _forget(self) -> None:
        if self._record is not None:
            ownership.release(self.target, self._record)
            self._record = None

    def stop(self) -> None:
        if self.result is None:
            with contextlib.suppress(Exception):
                self.target.run(["/bin/busybox", "kill", "-9", str(self.pid)], timeout=10)
                self.result = self.target.wait(self.handle, timeout=5)
        if self.result is not None:
            self._forget()
