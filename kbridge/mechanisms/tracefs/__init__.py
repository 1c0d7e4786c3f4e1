"""The tracefs mechanism: kprobe_events lines, event filters, trace_pipe streamed to the host.

render.py turns a ProbeSpec into lines (kbridge.kprobe_events checks them offline); events()
here checks them and resolves their symbols, and hands back the run as the engine's Armed probe:
armed.py holds what both ways of arming share (the run's state, reading trace_pipe, the totals),
scripted.py arms in three guest commands (script.py: kbridge/guest/tracefs.sh), stepwise.py one
tracefs file operation at a time from the host (guest.py does each; steps.py shows them for
`trace --steps`, and a target that runs no guest script uses it too). collect.py parses
trace_pipe. One run: check the lines, resolve their symbols, append them to kprobe_events, set
each event's filter (always excluding kbridge's own guest processes), start the trace_pipe
reader, enable, run the workload, disable, drain trace_pipe up to an end marker, then remove
exactly the events it added. kprobe_events, buffer_size_kb and tracing_on are left as they were
found, whatever happened (a rejected line, a bad filter, a failing workload, Ctrl-C).
"""

from __future__ import annotations

from dataclasses import replace

from kbridge import kprobe_events, progress
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.mechanisms import Mechanism
from kbridge.mechanisms.engine import HitSink, MechanismResult, StopRule, drive
from kbridge.mechanisms.tracefs import render
from kbridge.mechanisms.tracefs.armed import Events, HitAdapter
from kbridge.mechanisms.tracefs.collect import EventInfo
from kbridge.mechanisms.tracefs.guest import build_filter
from kbridge.mechanisms.tracefs.scripted import Scripted
from kbridge.mechanisms.tracefs.steps import StepReporter, StepSink, syscall_rewrite_note
from kbridge.mechanisms.tracefs.stepwise import Stepwise
from kbridge.session import Session
from kbridge.spec import Hit, ProbeSpec
from kbridge.workload import Workload


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
) -> Events:
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
    cls: type[Events] = Scripted if reporter is None and session.target.scripted_tracefs else Stepwise
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


def arm(session: Session, spec: ProbeSpec, prepared: object = None) -> Events:
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
