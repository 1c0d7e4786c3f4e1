"""The tracefs mechanism: kprobe_events lines, event filters, trace_pipe streamed to the host.

One run: check the lines offline (kbridge.events), resolve their symbols,
append them to kprobe_events, set each event's filter (always excluding
kbridge's own guest processes), enable, run the workload, disable, drain
trace_pipe up to an end marker, then remove exactly the events it added.
kprobe_events, buffer_size_kb and tracing_on are left as they were found,
whatever happened (a rejected line, a bad filter, a failing workload, Ctrl-C).

Nothing is hidden: events overwritten in the ring buffer before they were
read (per_cpu/cpuN/stats overrun, "[LOST n EVENTS]" lines) are `lost`, and
kprobe_profile's nmissed is `missed`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from kbridge import events, ownership, progress
from kbridge.arch import Arch
from kbridge.collect.histogram import ReturnPairer
from kbridge.collect.trace_pipe import (
    CpuStats,
    EventInfo,
    TracePipeParser,
    parse_cpu_stats,
    parse_kprobe_profile,
)
from kbridge.collect.tracefs_steps import StepReporter, StepSink, shell_quote, syscall_rewrite_note
from kbridge.errors import KbridgeError
from kbridge.mechanisms import Mechanism
from kbridge.mechanisms.common import HitSink, MechanismResult, Stopper, StopRule, WorkloadRun
from kbridge.render import tracefs as render
from kbridge.session import Session
from kbridge.spec import Hit, ProbeSpec
from kbridge.targets.base import TRACE_PORT, Target
from kbridge.targets.qga import ChannelError
from kbridge.workload import Workload

TRACING = "/sys/kernel/tracing"
KPROBE_EVENTS = f"{TRACING}/kprobe_events"
# Copy a file (trace_pipe) to a stream's guest path; the paths are arguments, never pasted into the script.
STREAM = ["/bin/sh", "-c", 'exec cat "$1" > "$2"', "kbridge-stream"]
# The ring buffer per CPU during a run when the user names none: 6.1's default (1408 KiB) overruns
# while the host reader catches up with a burst (21 % of 200 000 dd writes were lost); 16 MiB
# holds that burst. The guest's own setting is restored after the run.
DEFAULT_BUFFER_KB = 16384
MARKER_TIMEOUT_S = 60.0  # TCG on a loaded host: trace_pipe -> cat -> virtio -> host
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
    user: str | None = None, pid: int | None = None, comm: str | None = None, exclude: list[int] | tuple[int, ...] = ()
) -> str:
    """One event filter: the user's expression, --pid, --comm, and never kbridge's own pids.

    6.1 has no common_tgid field, so --pid matches common_pid (the thread id):
    the process itself, not its other threads.
    """
    parts = []
    if user is not None and user.strip():
        if "\n" in user or "\0" in user:
            raise KbridgeError(f"invalid --filter {user!r}: one line only")
        parts.append(f"({user.strip()})")
    if pid is not None:
        if pid <= 0:
            raise KbridgeError(f"invalid --pid {pid}")
        parts.append(f"common_pid == {pid}")
    if comm is not None:
        if not _COMM.fullmatch(comm) or any(c in comm for c in '"\\'):
            raise KbridgeError(
                f"invalid --comm {comm!r}: 1-15 printable characters without spaces, quotes or backslashes"
            )
        parts.append(f'comm == "{comm}"')
    parts += [f"common_pid != {p}" for p in exclude]
    return " && ".join(parts)


# --- guest tracefs helpers -----------------------------------------------------


def existing_events(text: str, arch: str, kernel: str | None = None) -> dict[str, str]:
    """GROUP/EVENT -> line, for what kprobe_events lists now (in KERNEL's grammar: 6.6+ lists BTF names)."""
    out = {}
    for line in text.splitlines():
        with contextlib.suppress(KbridgeError):
            ev = events.parse(line, arch, kernel=kernel)
            if isinstance(ev, events.ProbeEvent):
                out[f"{ev.effective_group}/{ev.effective_event}"] = line
    return out


def _event_dir(ev: events.ProbeEvent) -> str:
    return f"{TRACING}/events/{ev.effective_group}/{ev.effective_event}"


def _error_log(vm: Target) -> list[events.ErrorLogEntry]:
    with contextlib.suppress(ChannelError):
        return events.parse_error_log(vm.read_file(f"{TRACING}/error_log").decode(errors="replace"))
    return []


def _new_entries(before: list[events.ErrorLogEntry], after: list[events.ErrorLogEntry]) -> list[events.ErrorLogEntry]:
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
    before = _error_log(vm)
    try:
        vm.write_file(KPROBE_EVENTS, (line + "\n").encode(), mode="a")
    except ChannelError as e:
        if steps:
            steps.failed(f"echo {shell_quote(line)} >> kprobe_events")
        why = str(e).rsplit(":", 1)[-1].strip()
        new = [x for x in _new_entries(before, _error_log(vm)) if x.subsystem == "trace_kprobe"]
        if not new:
            raise KbridgeError(
                f"the guest kernel rejected {line!r}: {why} (nothing in error_log)",
                "see Documentation/trace/kprobetrace.rst",
            ) from None
        entry = new[-1]
        raise events.EventSyntaxError(
            line, entry.error_class, entry.error, map_position(line, entry.position), entry.command, entry.position
        ) from None


def remove(vm: Target, ev: events.ProbeEvent) -> None:
    vm.write_file(KPROBE_EVENTS, (render.removal_line(ev) + "\n").encode(), mode="a")


def set_filter(vm: Target, ev: events.ProbeEvent, text: str, steps: StepReporter | None = None) -> None:
    """Write an event filter; a parse error is reported with the kernel's message and caret."""
    if not text:
        return
    path = f"{_event_dir(ev)}/filter"
    before = _error_log(vm)
    try:
        vm.write_file(path, text.encode())
        if steps:
            steps.wrote(path, text)
    except ChannelError:
        if steps:
            steps.failed(f"echo {shell_quote(text)} > {path}")
        new = _new_entries(before, _error_log(vm))
        detail = str(new[-1]).rstrip() if new else vm.read_file(path).decode(errors="replace").rstrip()
        raise KbridgeError(
            f"the guest kernel rejected the filter for {ev.effective_group}/{ev.effective_event}:\n{detail}",
            "filters use the event's field names (see its format file), e.g. --filter 'fd == 1'",
        ) from None


def read_stats(vm: Target) -> dict[str, CpuStats]:
    """per_cpu/cpuN/stats for every CPU the guest has."""
    out = {}
    # tracefs has a per_cpu/cpuN for each possible CPU (for_each_tracing_cpu): read that
    # list, a file, rather than start ls in the guest.
    for n in parse_cpu_list(vm.read_file("/sys/devices/system/cpu/possible").decode()):
        with contextlib.suppress(ChannelError):
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


def resolve_symbols(session: Session, parsed: list[events.ProbeEvent], notes: list[str]) -> list[events.ProbeEvent]:
    """Check each probed symbol against the target kernel; syscall aliases become their entry.

    Unknown, non-unique and blacklisted symbols raise Session.resolve's errors
    (with near matches) before anything is written to the guest.
    """
    out = []
    for ev in parsed:
        if ev.symbol is None or ev.module is not None:
            out.append(ev)
            continue
        res = session.resolve(ev.symbol)
        if res.symbol != ev.symbol:
            notes.append(f"resolved {res.note}")
            if why := syscall_rewrite_note(ev.symbol, res.symbol, session.arch):
                notes.append(why)
            if any(isinstance(a.fetch, events.Arg) for a in ev.args):
                notes.append(
                    f"{res.symbol}'s only argument is the user's pt_regs: $argN there is not "
                    f"the syscall's argument (fetch them through it, e.g. +OFFSET($arg1))"
                )
            # Keep the event name the user asked for (or would have got).
            ev = replace(ev, symbol=res.symbol, event=ev.effective_event)
        out.append(ev)
    return out


# --- the run -------------------------------------------------------------------

HitAdapter = Callable[[EventInfo, Hit], Hit]


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
    spec: ProbeSpec | None = None,
    adapt: HitAdapter | None = None,
    steps: StepSink | None = None,
) -> MechanismResult:
    """Define LINES in the session's guest, run WORKLOAD, stream and count, remove them.

    ``counters`` maps GROUP/EVENT to the events read; ``lost`` counts events
    overwritten before they were read; ``missed`` is kprobe_profile's nmissed.
    STEPS, if given, receives each tracefs operation with the files read back after it.
    A return event's hits get the time since their thread's hit of an entry event on
    the same symbol (duration_ns, from trace_pipe's microsecond timestamps).
    """
    vm = session.target
    rep = StepReporter(vm, steps) if steps else None
    arch = session.arch
    for line in lines:
        if any(c in line for c in "\n\r\0"):
            raise KbridgeError(f"invalid event line {line!r}: one kprobe_events command per line")
    checked = render.check_lines(lines, arch, session.image.suite)  # that kernel's grammar
    if not checked:
        raise KbridgeError("no event line given", "e.g. kbridge trace 'p:myw ksys_write fd=$arg1'")
    if buffer_kb is not None and buffer_kb <= 0:
        raise KbridgeError(f"invalid --buffer-kb {buffer_kb}: must be > 0")
    filter_base = build_filter(filter, pid, comm)  # validates before anything is written
    notes: list[str] = []
    parsed = resolve_symbols(session, checked, notes)
    for n in notes:
        progress.info(n)
    infos = {ev.effective_event: EventInfo.from_probe(ev) for ev in parsed}
    parser = TracePipeParser(infos)
    placeholder = spec or ProbeSpec(parsed[0].symbol or "?")
    result = MechanismResult("tracefs", placeholder, notes=notes)
    result.counters = {info.full_name: 0 for info in infos.values()}

    state = GuestTracingState.read(vm)
    if buffer_kb is None and state.buffer_size_kb < DEFAULT_BUFFER_KB:
        buffer_kb = DEFAULT_BUFFER_KB
    existing = existing_events(state.kprobe_events, arch.name, session.image.suite)
    by_event = {full.split("/", 1)[1]: full for full in existing}
    for ev in parsed:
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
    token = secrets.token_hex(4)
    records: list[ownership.Record] = []  # what a killed run leaves is reclaimed by the next command
    defined: list[events.ProbeEvent] = []
    stream_pid: int | None = None
    port: Iterator[str | None] | None = None
    stats_before: dict[str, CpuStats] = {}
    work: WorkloadRun | None = None
    seen_start = False
    completed = False
    returns = ReturnPairer()
    entries = {f"{ev.effective_group}/{ev.effective_event}" for ev in parsed if not ev.is_return and not ev.offset}

    def handle(line: str) -> bool:
        rec = parser.feed(line)
        if rec is None:
            return False
        info = infos[rec.event]
        result.counters[info.full_name] += 1
        if stop.count is not None and len(result.hits) >= stop.count:
            return True
        hit = parser.hit(rec)
        if info.is_return or info.full_name in entries:
            returns.feed(hit)  # a return's duration: since its thread's hit of an entry event on that symbol
        result.take(adapt(info, hit) if adapt is not None else hit, stop, on_hit, work)
        return True

    def read_until(marker: str, timeout: float) -> bool:
        """Handle lines up to our trace_marker line; lines before the start marker are not ours
        (a previous, interrupted run may have left some in the port)."""
        nonlocal seen_start
        assert port is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = next(port)
            if line is None:
                continue
            if line.endswith(f"tracing_mark_write: {marker}"):
                seen_start = True
                return True
            if seen_start:
                handle(line)
        return False

    try:
        if buffer_kb is not None:
            vm.write_file(f"{TRACING}/buffer_size_kb", str(buffer_kb).encode())
        if state.tracing_on != "1":
            vm.write_file(f"{TRACING}/tracing_on", b"1")
        for ev, original, line in zip(parsed, checked, lines, strict=True):
            records.append(ownership.claim(vm, "event", f"{ev.effective_group}/{ev.effective_event}"))
            written = line if ev == original else events.format(ev)
            define(vm, written, rep)
            defined.append(ev)
            if rep:
                rep.defined(written, ev.effective_group, ev.effective_event)
        vm.write_file(f"{TRACING}/trace", b"")  # start from an empty ring buffer
        port = vm.stream(TRACE_PORT)
        next(port)  # connect the host side before the guest writes
        stats_before = read_stats(vm)
        stream_pid = vm.spawn([*STREAM, f"{TRACING}/trace_pipe", vm.stream_path(TRACE_PORT)])
        records.append(ownership.claim_process(vm, vm.guest_pid(stream_pid)))
        exclude = sorted({*session.plumbing_pids(), vm.guest_pid(stream_pid)})
        text = build_filter(filter, pid, comm, exclude) if filter_base or exclude else ""
        for ev in defined:
            if filter is not None and filter.strip():
                # The user's expression alone first, so the kernel's caret points into it.
                set_filter(vm, ev, filter.strip(), rep)
            set_filter(vm, ev, text, rep)
        vm.write_file(f"{TRACING}/trace_marker", f"kbridge-start-{token}".encode())
        if not read_until(f"kbridge-start-{token}", MARKER_TIMEOUT_S):
            raise KbridgeError(
                f"trace_pipe did not reach the host (no start marker within {MARKER_TIMEOUT_S:.0f} s)",
                "kbridge doctor checks the guest's stream ports",
            )
        for ev in defined:
            vm.write_file(f"{_event_dir(ev)}/enable", b"1")
            if rep:
                rep.wrote(f"{_event_dir(ev)}/enable", "1")
        if rep:
            rep.reading(f"{TRACING}/trace_pipe", "each event as the kernel records it (the hits below)")
        work = WorkloadRun(vm, workload)
        # No quiet time once the workload ends: the end marker below drains what is left.
        stopper = Stopper(stop, work, drain_s=0.0)
        while True:
            pipe_line = next(port)
            got = pipe_line is not None and handle(pipe_line)
            if stopper.done(len(result.hits), got):
                break
        # Drain: disable, then read up to a marker written after the last event.
        for ev in defined:
            vm.write_file(f"{_event_dir(ev)}/enable", b"0")
            if rep:
                rep.wrote(f"{_event_dir(ev)}/enable", "0")
        vm.write_file(f"{TRACING}/trace_marker", f"kbridge-end-{token}".encode())
        if not read_until(f"kbridge-end-{token}", MARKER_TIMEOUT_S):
            result.notes.append("trace_pipe did not drain to the end marker: some events may be unread")
        completed = True
    finally:
        # After Ctrl-C mid-call the agent drops the late reply itself (GuestAgent.call).
        _teardown(session, state, defined, stream_pid, work, buffer_kb, result, stats_before, parser, completed, rep)
        for rec in records:
            ownership.release(vm, rec)
    result.record_workload(work)
    return result


def _teardown(
    session: Session,
    state: GuestTracingState,
    defined: list[events.ProbeEvent],
    stream_pid: int | None,
    work: WorkloadRun | None,
    buffer_kb: int | None,
    result: MechanismResult,
    stats_before: dict[str, CpuStats],
    parser: TracePipeParser,
    completed: bool,
    rep: StepReporter | None = None,
) -> None:
    """Undo everything the run did, step by step, so one failure does not skip the rest."""
    vm = session.target
    failures: list[str] = []

    def step(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - keep undoing; report at the end
            failures.append(f"{what}: {e}")

    if work is not None:
        step("stop the workload", work.stop)
    for ev in defined:
        step(f"disable {ev.effective_event}", functools.partial(vm.write_file, f"{_event_dir(ev)}/enable", b"0"))
    if stream_pid is not None:
        step(
            "stop the trace_pipe stream",
            lambda: vm.run(["/bin/busybox", "kill", str(vm.guest_pid(stream_pid))], timeout=10),
        )
        step("reap the trace_pipe stream", lambda: vm.wait(stream_pid, timeout=10))
    with contextlib.suppress(Exception):
        vm.close_stream(TRACE_PORT)
    if completed:
        step("count lost and missed events", lambda: _count_losses(vm, result, stats_before, parser, defined))
        if rep:
            rep.show(
                f"{TRACING}/kprobe_profile", "EVENT, times the probe fired (before any filter), times it was missed"
            )
    for ev in reversed(defined):
        step(f"remove {ev.effective_group}/{ev.effective_event}", functools.partial(remove, vm, ev))
        if rep:
            rep.removed(render.removal_line(ev), ev.effective_group, ev.effective_event)
    if buffer_kb is not None:
        step(
            "restore buffer_size_kb",
            lambda: vm.write_file(f"{TRACING}/buffer_size_kb", str(state.buffer_size_kb).encode()),
        )
    if state.tracing_on != "1":
        step("restore tracing_on", lambda: vm.write_file(f"{TRACING}/tracing_on", state.tracing_on.encode()))
    with contextlib.suppress(Exception):
        now = vm.read_file(KPROBE_EVENTS).decode()
        if now != state.kprobe_events:
            failures.append(f"kprobe_events differs from before the run: {now!r}")
    if failures:
        msg = "tracefs cleanup failed: " + "; ".join(failures)
        if completed:
            raise KbridgeError(msg, "kbridge vm down stops the VM and with it every probe")
        progress.warn(msg)


def _count_losses(
    vm: Target,
    result: MechanismResult,
    stats_before: dict[str, CpuStats],
    parser: TracePipeParser,
    defined: list[events.ProbeEvent],
) -> None:
    parser.flush()
    already = len(result.notes)
    after = read_stats(vm)
    overrun = sum((after[c] - stats_before.get(c, CpuStats())).lost for c in after)
    result.lost = max(overrun, parser.lost)
    if parser.lost and parser.lost != overrun:
        result.notes.append(
            f"trace_pipe reported {parser.lost} lost events, the ring buffer stats {overrun}; counting {result.lost}"
        )
    if parser.unparsed:
        result.notes.append(f"{len(parser.unparsed)} trace_pipe lines did not parse, e.g. {parser.unparsed[0][:200]!r}")
    profile = parse_kprobe_profile(vm.read_file(f"{TRACING}/kprobe_profile").decode())
    result.missed = sum(profile.get(ev.effective_event, (0, 0))[1] for ev in defined)
    if result.lost:
        if len(defined) == 1:
            # hits stay exact: events read + events the ring buffer overwrote before they were read.
            (name,) = result.counters
            result.counters[name] += result.lost
        result.notes.append(
            f"{result.lost} events were overwritten in the ring buffer before they were read "
            "(a larger --buffer-kb keeps them)"
            + ("" if len(defined) == 1 else "; the per-event counts are the events read")
        )
    for note in result.notes[already:]:
        progress.warn(note)


def check(spec: ProbeSpec, arch: Arch) -> None:
    """What kprobe_events cannot do for SPEC, said before any VM boots (rendering checks it all)."""
    render.render(spec, arch)


def run(
    session: Session,
    spec: ProbeSpec,
    workload: Workload,
    stop: StopRule = StopRule(),
    on_hit: HitSink | None = None,
    prepared: object = None,
) -> MechanismResult:
    """Probe SPEC through kprobe_events: the `--via tracefs` path of kbridge probe.

    Counters are by handler, as for the module; handlers tracefs cannot tell
    apart (--pre/--post/--entry share the one kprobe event) get the same count.
    """
    rendered = render.render(spec, session.arch)
    by_event = {r.event.effective_event: r for r in rendered}

    def adapt(info: EventInfo, hit: Hit) -> Hit:
        handlers = by_event[info.name].handlers
        hit.handler = handlers[0]
        if info.is_return:
            ret = hit.args.pop("ret", None)
            hit.retval = ret if isinstance(ret, int) else None
        if render.IP_ARG in hit.args:
            # %ip/%pc and %flags/%pstate as the kprobe handler saw them; tracefs shows no probe address.
            hit.ip = int(hit.args.pop(render.IP_ARG))
            hit.flags = int(hit.args.pop(render.FLAGS_ARG))
            hit.arch = session.arch.name
        return hit

    result = run_lines(
        session,
        [r.line for r in rendered],
        workload,
        stop,
        on_hit,
        pid=spec.pid,
        comm=spec.comm,
        spec=spec,
        adapt=adapt,
    )
    counters: dict[str, int] = {}
    for r in rendered:
        for h in r.handlers:
            counters[h] = result.counters.get(r.full_name, 0)
    result.counters = counters
    result.notes[:0] = render.spec_notes(spec)
    return result


MECHANISM = Mechanism("tracefs", "default", check, None, run)
