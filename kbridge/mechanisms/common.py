"""What every mechanism shares: when to stop, what a run produced, guest process control."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kbridge.spec import Hit, ProbeSpec
from kbridge.targets.qemu import QemuVM
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

    @property
    def total(self) -> int:
        return sum(self.counters.values())


class WorkloadRun:
    """A workload started in the guest; stopped with kill if still running when we are done."""

    def __init__(self, vm: QemuVM, workload: Workload) -> None:
        self.vm = vm
        self.started = time.monotonic()
        self.pid = vm.spawn(list(workload.argv))
        self.result = None
        self._next_poll = 0.0

    def done(self) -> bool:
        """Whether it exited (polled at most every 20 ms)."""
        if self.result is None and time.monotonic() >= self._next_poll:
            self.result = self.vm.poll(self.pid)
            self._next_poll = time.monotonic() + 0.02
        return self.result is not None

    def stop(self) -> None:
        if self.result is None:
            with contextlib.suppress(Exception):
                self.vm.run(["/bin/busybox", "kill", "-9", str(self.pid)], timeout=10)
                self.result = self.vm.agent.wait(self.pid, timeout=5)
