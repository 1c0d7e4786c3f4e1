"""A tracefs run one file operation at a time from the host: what `trace --steps` shows.

Each append to kprobe_events, filter, enable and read is one agent call (guest.py), ~40 round
trips before the first event, so that each can be reported with the files read back after it
(steps.py), and so that a target that runs no guest script (a Vagrant machine over SSH) can trace.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

from kbridge import kprobe_events, progress
from kbridge.errors import KbridgeError
from kbridge.mechanisms.tracefs import guest, render
from kbridge.mechanisms.tracefs.armed import DEFAULT_BUFFER_KB, MARKER_TIMEOUT_S, Events
from kbridge.mechanisms.tracefs.collect import CpuStats
from kbridge.mechanisms.tracefs.guest import TRACING, GuestTracingState, build_filter
from kbridge.spec import Hit
from kbridge.targets import ownership
from kbridge.targets.base import TRACE_PORT

# Copy a file (trace_pipe) to a stream's guest path; the paths are arguments, never pasted into the script.
STREAM = ["/bin/sh", "-c", 'exec cat "$1" > "$2"', "kbridge-stream"]


class Stepwise(Events):
    """The events armed, drained and removed file operation by file operation, each one reported
    to the --steps reporter when there is one."""

    # -- arming ---------------------------------------------------------------------

    def __enter__(self) -> Stepwise:
        vm, rep = self.vm, self.rep
        if rep:
            rep.mounts()
        self.state = state = GuestTracingState.read(vm)
        if self.buffer_kb is None and state.buffer_size_kb < DEFAULT_BUFFER_KB:
            self.buffer_kb = DEFAULT_BUFFER_KB
        self._refuse_clashes(state)
        try:
            if self.buffer_kb is not None:
                vm.write_file(f"{TRACING}/buffer_size_kb", str(self.buffer_kb).encode())
            if state.tracing_on != "1":
                vm.write_file(f"{TRACING}/tracing_on", b"1")
            for ev, original, line in zip(self.parsed, self.checked, self.lines, strict=True):
                self.records.append(ownership.claim(vm, "event", f"{ev.effective_group}/{ev.effective_event}"))
                written = line if ev == original else kprobe_events.format(ev)
                guest.define(vm, written, rep)
                self.defined.append(ev)
                if rep:
                    rep.defined(written, ev.effective_group, ev.effective_event)
            vm.write_file(f"{TRACING}/trace", b"")  # start from an empty ring buffer
            self.port = vm.stream(TRACE_PORT)
            next(self.port)  # connect the host side before the guest writes
            self.stats_before = guest.read_stats(vm)
            self.reader = ownership.spawn(vm, [*STREAM, f"{TRACING}/trace_pipe", vm.stream_path(TRACE_PORT)])
            exclude = sorted({*vm.plumbing_pids(), self.reader.pid})
            threads = self._threads()
            text = build_filter(self.user_filter, threads, self.comm, exclude)
            why = (
                f"kbridge adds 'common_pid != ...' for {', '.join(map(str, exclude))}: its own guest helpers "
                "(the agent running commands, the trace_pipe reader), whose writes would otherwise be hits"
            )
            for ev in self.defined:
                if self.user_filter is not None and self.user_filter.strip():
                    # The user's expression alone first, so the kernel's caret points into it.
                    guest.set_filter(vm, ev, self.user_filter.strip(), rep)
                guest.set_filter(vm, ev, text, rep, note=why)
            vm.write_file(f"{TRACING}/trace_marker", f"kbridge-start-{self.token}".encode())
            try:
                for _ in self._read_until(f"kbridge-start-{self.token}"):
                    pass  # nothing is enabled yet: no hit comes before the start marker
            except TimeoutError:
                raise KbridgeError(
                    f"trace_pipe did not reach the host (no start marker within {MARKER_TIMEOUT_S:.0f} s)",
                    "kbridge doctor checks the guest's stream ports",
                ) from None
            for ev in self.defined:
                guest.enable(vm, ev, True, rep)
            if rep:
                rep.reading(f"{TRACING}/trace_pipe", "each event as the kernel records it (the hits below)")
        except BaseException:
            self._teardown(completed=False)
            raise
        return self

    def _refuse_clashes(self, state: GuestTracingState) -> None:
        existing = guest.existing_events(state.kprobe_events, self.session.grammar)
        by_event = {full.split("/", 1)[1]: full for full in existing}
        for ev in self.parsed:
            name = f"{ev.effective_group}/{ev.effective_event}"
            if name not in existing and ev.effective_event in by_event:
                other = by_event[ev.effective_event]
                raise KbridgeError(
                    f"the guest already has a kprobe event {other} ({existing[other]!r}): trace_pipe "
                    f"would print its hits and those of {name} alike, as {ev.effective_event!r}",
                    "give yours another event name: p:GROUP/NAME ...",
                )
            if name in existing:
                # 6.1 would append a same-named line as another probe of that event
                # (multi-probe events), and removing ours would remove the user's too.
                raise KbridgeError(
                    f"the guest already has a kprobe event {name}: {existing[name]!r}",
                    "name yours differently: p:GROUP/NAME ...",
                )

    # -- reading --------------------------------------------------------------------

    def drain(self) -> Iterator[Hit]:
        """Disable, then read up to a marker written after the last event."""
        for ev in self.defined:
            guest.enable(self.vm, ev, False, self.rep)
        self.vm.write_file(f"{TRACING}/trace_marker", f"kbridge-end-{self.token}".encode())
        try:
            yield from self._read_until(f"kbridge-end-{self.token}")
        except TimeoutError:
            self.undrained = True
        self.drained = True

    def _stats_after(self) -> dict[str, CpuStats]:
        return guest.read_stats(self.vm)

    def _profile(self) -> str:
        return self.vm.read_file(f"{TRACING}/kprobe_profile").decode()

    # -- disarming ------------------------------------------------------------------

    def _teardown(self, completed: bool) -> None:
        """Undo everything the run did, step by step, so one failure does not skip the rest."""
        vm, rep = self.vm, self.rep
        failures: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep undoing; report at the end
                failures.append(f"{what}: {e}")

        for ev in self.defined:
            step(f"disable {ev.effective_event}", functools.partial(guest.enable, vm, ev, False))
        if self.reader is not None:
            step("stop the trace_pipe reader", self.reader.stop)
        with contextlib.suppress(Exception):
            vm.close_stream(TRACE_PORT)
        for ev in reversed(self.defined):
            step(f"remove {ev.effective_group}/{ev.effective_event}", functools.partial(guest.remove, vm, ev))
            if rep:
                rep.removed(render.removal_line(ev), ev.effective_group, ev.effective_event)
        state = self.state
        if state is not None:
            if self.buffer_kb is not None:
                step(
                    "restore buffer_size_kb",
                    lambda: vm.write_file(f"{TRACING}/buffer_size_kb", str(state.buffer_size_kb).encode()),
                )
            if state.tracing_on != "1":
                step("restore tracing_on", lambda: vm.write_file(f"{TRACING}/tracing_on", state.tracing_on.encode()))
            with contextlib.suppress(Exception):
                now = vm.read_file(guest.KPROBE_EVENTS).decode()
                if now != state.kprobe_events:
                    failures.append(f"kprobe_events differs from before the run: {now!r}")
        if not failures:
            for rec in self.records:
                ownership.release(vm, rec)
        if failures:
            msg = "tracefs cleanup failed: " + "; ".join(failures)
            if completed:
                raise KbridgeError(msg, "kbridge vm down stops the VM and with it every probe")
            progress.warn(msg)
