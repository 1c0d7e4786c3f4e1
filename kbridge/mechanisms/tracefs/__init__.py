"""The tracefs mechanism: kprobe_events lines, event filters, trace_pipe streamed to the host.

(Over 500 lines: the two ways of arming events, a step per file operation for --steps and the
labs, one guest script for a warm probe, share one class and one cleanup contract.)

render.py turns a ProbeSpec into lines (kbridge.kprobe_events checks them offline),
guest.py does each tracefs file operation, collect.py parses trace_pipe, steps.py
shows the operations (`trace --steps`). One run: check the lines, resolve their
symbols, append them to kprobe_events, set each event's filter (always excluding
kbridge's own guest processes), start the trace_pipe reader, enable, run the
workload, disable, drain trace_pipe up to an end marker, then remove exactly the
events it added. kprobe_events, buffer_size_kb and tracing_on are left as they were
found, whatever happened (a rejected line, a bad filter, a failing workload, Ctrl-C).

Nothing is hidden: events overwritten in the ring buffer before they were read
(per_cpu/cpuN/stats overrun, "[LOST n EVENTS]" lines) are `lost`, and
kprobe_profile's nmissed is `missed`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import TracebackType

from kbridge import kprobe_events, progress
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.mechanisms import Mechanism
from kbridge.mechanisms.engine import HitSink, MechanismResult, StopRule, Totals, drive
from kbridge.mechanisms.histogram import ReturnPairer
from kbridge.mechanisms.tracefs import guest, render, script
from kbridge.mechanisms.tracefs.collect import (
    CpuStats,
    EventInfo,
    TracePipeParser,
    parse_cpu_stats,
    parse_kprobe_profile,
)
from kbridge.mechanisms.tracefs.guest import TRACING, GuestTracingState, build_filter
from kbridge.mechanisms.tracefs.steps import StepReporter, StepSink, syscall_rewrite_note
from kbridge.session import Session
from kbridge.spec import Hit, ProbeSpec
from kbridge.targets import ownership
from kbridge.targets.base import TRACE_PORT, LineStream, Target
from kbridge.workload import Workload

# Copy a file (trace_pipe) to a stream's guest path; the paths are arguments, never pasted into the script.
STREAM = ["/bin/sh", "-c", 'exec cat "$1" > "$2"', "kbridge-stream"]
# The ring buffer per CPU during a run when the user names none: 6.1's default (1408 KiB) overruns
# while the host reader catches up with a burst (21 % of 200 000 dd writes were lost); 16 MiB
# holds that burst. The guest's own setting is restored after the run.
DEFAULT_BUFFER_KB = 16384
MARKER_TIMEOUT_S = 60.0  # TCG on a loaded host: trace_pipe -> cat -> virtio -> host

HitAdapter = Callable[[EventInfo, Hit], Hit]


def resolve_symbols(
    session: Session, parsed: list[kprobe_events.ProbeEvent], notes: list[str]
) -> list[kprobe_events.ProbeEvent]:
    """Check each probed symbol against the target kernel; syscall aliases become their entry.

    Unknown, non-unique and blacklisted symbols raise Session.resolve's errors
    (with near matches) before anything is written to the guest.
    """
    out = []
    for ev in parsed:
        if ev.symbol is None or ev.module is not None:
            out.append(_with_btf_checked(session, ev))
            continue
        res = session.resolve(ev.symbol)
        if res.symbol != ev.symbol:
            notes.append(f"resolved {res.note}")
            if why := syscall_rewrite_note(ev.symbol, res.symbol, session.arch):
                notes.append(why)
            if any(isinstance(a.fetch, kprobe_events.Arg) for a in ev.args):
                notes.append(
                    f"{res.symbol}'s only argument is the user's pt_regs: $argN there is not "
                    f"the syscall's argument (fetch them through it, e.g. +OFFSET($arg1))"
                )
            # Keep the event name the user asked for (or would have got).
            module, _, symbol = res.symbol.rpartition(":")
            ev = replace(ev, symbol=symbol, module=module or None, event=ev.effective_event)
        out.append(_with_btf_checked(session, ev))
    return out


def _with_btf_checked(session: Session, ev: kprobe_events.ProbeEvent) -> kprobe_events.ProbeEvent:
    """EV, unless it names arguments by BTF on a function of a module that has no BTF."""
    if ev.module and render.btf_names(ev) and not session.has_btf(ev.module):
        raise render.no_btf(ev, ev.module, f"/sys/kernel/btf/{ev.module} is absent: it was built without BTF")
    return ev


class _Events:
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

    # -- arming ---------------------------------------------------------------------

    def __enter__(self) -> _Events:
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
            threads = _threads(vm, self.pid, self.tid, self.notes)
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

    def _stats_after(self) -> dict[str, CpuStats]:
        return guest.read_stats(self.vm)

    def _profile(self) -> str:
        return self.vm.read_file(f"{TRACING}/kprobe_profile").decode()

    # -- disarming ------------------------------------------------------------------

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # After Ctrl-C mid-call the agent drops the late reply itself.
        self._teardown(completed=self.drained)

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


class _Scripted(_Events):
    """The same run in three guest commands (kbridge/guest/tracefs.sh): arm, stop, undo.

    What _Events does file by file from the host (~40 agent round trips before the first event),
    the script does in the guest, in the same order, with the same refusals and explanations;
    `--steps` keeps _Events, since showing each operation and the files after it is its point.
    """

    def __enter__(self) -> _Scripted:
        vm = self.vm
        self.dir = f"{script.RUN_DIR}/tracefs-{self.token}"
        self.port = vm.stream(TRACE_PORT)
        next(self.port)  # connect the host side before the guest writes
        threads = _threads(vm, self.pid, self.tid, self.notes)
        exclude = sorted(vm.plumbing_pids())
        base = build_filter(self.user_filter, threads, self.comm, exclude)
        pairs: list[str] = []
        lines: list[str] = []
        for ev, original, line in zip(self.parsed, self.checked, self.lines, strict=True):
            rec, ledger_line = ownership.record("event", f"{ev.effective_group}/{ev.effective_event}")
            self.records.append(rec)
            lines.append(ledger_line)
            pairs += [
                line if ev == original else kprobe_events.format(ev),
                f"{ev.effective_group}/{ev.effective_event}",
            ]
        self.reader_tag = f"kb-{os.urandom(6).hex()}"
        reader, reader_line = ownership.record("process", self.reader_tag)
        self.records.append(reader)
        res = vm.run(
            script.argv(
                "arm",
                self.dir,
                ownership.LEDGER,
                "\n".join([*ownership.take_pending(vm), *lines]),
                self.reader_tag,
                reader_line,
                "" if self.buffer_kb is None else str(self.buffer_kb),
                str(DEFAULT_BUFFER_KB),
                vm.stream_path(TRACE_PORT),
                self.token,
                base,
                (self.user_filter or "").strip(),
                *pairs,
            ),
            timeout=120,
        )
        out = script.parse(res.text)
        if not res.ok or not out.verdict.startswith("ok "):
            error = self._refusal(out, res.stderr.decode(errors="replace"), pairs)
            self._teardown(completed=False)
            raise error
        self.defined = list(self.parsed)
        self.listed = out.text("L")
        self.stats_before = {cpu: parse_cpu_stats(text) for cpu, text in out.stats("S0").items()}
        return self

    def _refusal(self, out: script.Output, stderr: str, pairs: list[str]) -> KbridgeError:
        """What the arm script's refusal OUT means, as _Events says it."""
        kind, _, rest = out.verdict.partition(" ")
        before = kprobe_events.parse_error_log(out.text("E0"))
        after = kprobe_events.parse_error_log(out.text("E1"))
        if kind == "clash":
            how, name, *words = rest.split(" ")
            if how == "same":
                return KbridgeError(
                    f"the guest already has a kprobe event {name}: {' '.join(words).strip()!r}",
                    "name yours differently: p:GROUP/NAME ...",
                )
            other, *words = words
            return KbridgeError(
                f"the guest already has a kprobe event {other} ({' '.join(words).strip()!r}): trace_pipe "
                f"would print its hits and those of {name} alike, as {name.split('/', 1)[1]!r}",
                "give yours another event name: p:GROUP/NAME ...",
            )
        if kind == "define-failed":
            written = pairs[2 * (int(rest) - 1)]
            return guest.rejected_line(written, before, after, out.text("W").strip() or "write error")
        if kind == "filter-failed":
            ev = self.parsed[int(rest) - 1]
            return guest.rejected_filter(ev, before, after, out.text("F"))
        return KbridgeError(f"arming the tracefs events failed: {(out.verdict or stderr).strip()[-800:]}")

    def drain(self) -> Iterator[Hit]:
        """Disable, then the stop script (the end marker, the counters), then read up to its end marker."""
        # The guest agent disables: its writes are left out of the events, where the stop script's
        # shell, a new pid, would be counted for its own writes while the events are still on.
        for ev in self.defined:
            self.vm.write_file(f"{TRACING}/events/{ev.effective_group}/{ev.effective_event}/enable", b"0")
        res = self.vm.run(script.argv("stop", self.dir, self.token), timeout=60)
        self.stopped = script.parse(res.text)
        try:
            yield from self._read_until(f"kbridge-end-{self.token}")
        except TimeoutError:
            if not self.seen_start:
                raise KbridgeError(
                    f"trace_pipe did not reach the host (no start marker within {MARKER_TIMEOUT_S:.0f} s)",
                    "kbridge doctor checks the guest's stream ports",
                ) from None
            self.undrained = True
        self.drained = True

    def _stats_after(self) -> dict[str, CpuStats]:
        return {cpu: parse_cpu_stats(text) for cpu, text in self.stopped.stats("S1").items()}

    def _profile(self) -> str:
        return self.stopped.text("P")

    def _teardown(self, completed: bool) -> None:
        """The undo script: disable, stop the reader, remove the events, put the state back, release."""
        vm = self.vm
        with contextlib.suppress(Exception):
            vm.close_stream(TRACE_PORT)
        releases = [f"-{rec.key}" for rec in self.records]
        try:
            res = vm.run(
                script.argv("undo", self.dir, ownership.LEDGER, "\n".join(releases)),
                timeout=120,
            )
            out = script.parse(res.text)
            failures = [ln for ln in res.text.splitlines() if ln.startswith("failed ")]
            if out.verdict == "differs" or "differs" in res.text.splitlines():
                failures.append(f"kprobe_events differs from before the run: {out.text('K')!r}")
            if not res.ok and not failures:
                failures.append(res.stderr.decode(errors="replace").strip() or f"exit {res.exitcode}")
        except KbridgeError as e:
            failures = [e.message]
        if failures:
            msg = "tracefs cleanup failed: " + "; ".join(failures)
            if completed:
                raise KbridgeError(msg, "kbridge vm down stops the VM and with it every probe")
            progress.warn(msg)


def events(
    session: Session,
    lines: list[str],
    filter: str | None = None,  # noqa: A002 - the CLI's name
    buffer_kb: int | None = None,
    pid: int | None = None,
    comm: str | None = None,
    adapt: HitAdapter | None = None,
    steps: StepSink | None = None,
    handlers: dict[str, tuple[str, ...]] | None = None,
    tid: int | None = None,
) -> _Events:
    """LINES checked offline and their symbols resolved, as the engine's Armed probe (nothing in the
    guest changes until it is entered). HANDLERS (GROUP/EVENT -> the spec's handlers it serves) makes
    the counts per handler, as the module's are."""
    for line in lines:
        if any(c in line for c in "\n\r\0"):
            raise KbridgeError(f"invalid event line {line!r}: one kprobe_events command per line")
    checked = render.check_lines(lines, session.grammar)  # that kernel's grammar
    if not checked:
        raise KbridgeError("no event line given", "e.g. kbridge trace 'p:myw ksys_write fd=$arg1'")
    if buffer_kb is not None and buffer_kb <= 0:
        raise KbridgeError(f"invalid --buffer-kb {buffer_kb}: must be > 0")
    build_filter(filter, [t for t in (pid, tid) if t], comm)  # validates before anything is written
    notes: list[str] = []
    parsed = resolve_symbols(session, checked, notes)
    for n in notes:
        progress.info(n)
    reporter = StepReporter(session.target, steps) if steps else None
    # --steps shows every file operation: one at a time (and so on a target that runs no script).
    cls = _Scripted if reporter is None and session.target.scripted_tracefs else _Events
    armed = cls(session, lines, checked, parsed, filter, pid, comm, buffer_kb, adapt, reporter, handlers, tid)
    armed.notes = notes
    return armed


def run_lines(
    session: Session,
    lines: list[str],
    workload: Workload,
    stop: StopRule = StopRule(),
    on_hit: HitSink | None = None,
    filter: str | None = None,  # noqa: A002 - the CLI's name
    buffer_kb: int | None = None,
    pid: int | None = None,
    comm: str | None = None,
    steps: StepSink | None = None,
    tid: int | None = None,
) -> MechanismResult:
    """Define LINES in the session's guest, run WORKLOAD, stream and count, remove them (kbridge trace).

    ``counters`` maps GROUP/EVENT to the events read; ``lost`` counts events
    overwritten before they were read; ``missed`` is kprobe_profile's nmissed.
    STEPS, if given, receives each tracefs operation with the files read back after it.
    A return event's hits get the time since their thread's hit of an entry event on the
    same symbol (duration_ns, from trace_pipe's microsecond timestamps).
    """
    armed = events(session, lines, filter, buffer_kb, pid, comm, steps=steps, tid=tid)
    placeholder = ProbeSpec(armed.parsed[0].symbol or "?")
    return drive("tracefs", session.target, placeholder, workload, stop, on_hit, armed, armed.notes)


def check(spec: ProbeSpec, arch: Arch) -> None:
    """What kprobe_events cannot do for SPEC, said before any VM boots (rendering checks it all)."""
    render.render(spec, arch)


def arm(session: Session, spec: ProbeSpec, prepared: object = None) -> _Events:
    """SPEC as kprobe events: the `--via tracefs` path of kbridge probe.

    Counters are by handler, as for the module; handlers tracefs cannot tell
    apart (--pre/--post/--entry share the one kprobe event) get the same count.
    """
    rendered = render.render(spec, session.arch, session.grammar)
    by_event = {r.event.effective_event: r for r in rendered}

    def adapt(info: EventInfo, hit: Hit) -> Hit:
        hit.handler = by_event[info.name].handlers[0]
        if info.is_return:
            ret = hit.args.pop("ret", None)
            hit.retval = ret if isinstance(ret, int) else None
        if render.IP_ARG in hit.args:
            # %ip/%pc and %flags/%pstate as the kprobe handler saw them; tracefs shows no probe address.
            hit.ip = int(hit.args.pop(render.IP_ARG))
            hit.flags = int(hit.args.pop(render.FLAGS_ARG))
            hit.arch = session.arch.name
        return hit

    handlers = {r.full_name: r.handlers for r in rendered}
    armed = events(
        session, [r.line for r in rendered], pid=spec.pid, comm=spec.comm, adapt=adapt, handlers=handlers, tid=spec.tid
    )
    armed.spec_notes = render.spec_notes(spec)
    return armed


MECHANISM = Mechanism("tracefs", "default", check, None, arm)


def _threads(vm: Target, pid: int | None, tid: int | None, notes: list[str]) -> list[int]:
    """The threads --pid/--tid name, for the filter: an event records the thread (common_pid)."""
    threads: list[int] = [tid] if tid else []
    if pid:
        threads += guest.threads_of(vm, pid)
        notes.append(
            f"--pid {pid}: its threads when the events were armed ({', '.join(map(str, threads))}): "
            "an event records the thread (common_pid), and 6.1's events have no process id"
        )
    return threads
