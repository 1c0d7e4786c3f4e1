"""kprobe-events: the student's shell steps drive kprobe_events; each step is checked against
what tracefs really holds afterwards."""

from __future__ import annotations

import contextlib
import re
import secrets

from kbridge.labs import evidence
from kbridge.labs.checkers.common import probe_entry
from kbridge.labs.checkers.kprobe_module import wrapper_symbol
from kbridge.labs.context import LabContext
from kbridge.labs.grading import CheckSpec, Grader, StepTimeout
from kbridge.labs.guest import GUEST_DIR, WORKLOAD, WORKLOAD_COMM, guest_run
from kbridge.targets.base import GuestIOError

TRACING = "/sys/kernel/tracing"
EVENT = "sys_write_event"
EVDIR = f"{TRACING}/events/kprobes/{EVENT}"
MIN_CALLS, MAX_CALLS = 11, 39  # kblab write N, N drawn per run
STEP_TIMEOUT = 20.0  # a step is one or two commands: seconds are plenty, even under emulation
SCRIPT = f"{GUEST_DIR}/events.sh"

CHECKS = [
    CheckSpec(
        "define",
        f"kprobe_events lists p:kprobes/{EVENT} at the write syscall's entry, events/kprobes/{EVENT}/ exists, "
        "and the events other tools had defined are still there",
        "sys_write is __x64_sys_write on x86_64 and __arm64_sys_write on arm64 since 4.17; append "
        "with >> (a > would clear every other event); a rejected line is explained in "
        f"{TRACING}/error_log",
    ),
    CheckSpec(
        "filter",
        "the event's filter keeps only the workload: every recorded event is from kblab",
        f"write an expression over the event's fields to events/kprobes/{EVENT}/filter, e.g. "
        'comm == "kblab" (the fields are listed in its format file)',
    ),
    CheckSpec(
        "enable",
        "the event's enable file reads 1 and the kprobe is armed in kprobes/list",
        f"echo 1 > events/kprobes/{EVENT}/enable",
    ),
    CheckSpec(
        "trace",
        "the trace buffer holds one event per write() of the workload (a number drawn for each run)",
        "every hit while enabled is one line in trace; check the event is defined and enabled",
    ),
    CheckSpec(
        "read",
        "step_read prints the recorded events (the trace file)",
        "trace is the buffer as text (reading it does not consume it; trace_pipe does, and blocks)",
    ),
    CheckSpec(
        "disable",
        "after step_disable, enable reads 0 and the workload records nothing more",
        f"echo 0 > events/kprobes/{EVENT}/enable",
    ),
    CheckSpec(
        "remove",
        f"the event is gone from kprobe_events and events/kprobes/{EVENT}/ is gone",
        f"append '-:kprobes/{EVENT}' to kprobe_events (an enabled event cannot be removed: EBUSY)",
    ),
    CheckSpec(
        "clean",
        "kprobe_events is left as it was before the lab ran: other tools' events untouched",
        "remove exactly what you defined with -:, nothing else: `echo > kprobe_events` deletes every "
        "event on the machine, other tools' too",
    ),
]

_TRACE_LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[\d+\].*?\s(?P<event>\w+):\s")


def _step(ctx: LabContext, name: str) -> tuple[int, str]:
    # The step name is ours; the script is the student's shell code, which runs as written.
    try:
        return guest_run(
            ctx.target, ["/bin/sh", "-c", f". {SCRIPT} && step_{name}"], ctx.log, STEP_TIMEOUT, what=f"step_{name}"
        )
    except StepTimeout as e:
        body = _function(ctx.files["events.sh"], f"step_{name}")
        if "trace_pipe" in body:
            e.hint = (
                "trace_pipe blocks until events come, and waits for more: read `trace` instead, which "
                "prints the buffer and ends"
            )
        else:
            e.hint = f"step_{name} must end by itself: a command in it waits for input or for events"
        raise


def _function(script: str, name: str) -> str:
    """The body of shell function NAME in SCRIPT (up to the closing brace at the start of a line)."""
    m = re.search(rf"^{re.escape(name)}\s*\(\)\s*\{{(.*?)^\}}", script, re.M | re.S)
    return m[1] if m else ""


def _read(ctx: LabContext, path: str) -> str | None:
    try:
        return ctx.target.read_file(path).decode(errors="replace")
    except GuestIOError:
        return None


def _events(ctx: LabContext) -> list[tuple[str, str]]:
    """(comm, line) of each sys_write_event line in the trace buffer."""
    out = []
    for line in (_read(ctx, f"{TRACING}/trace") or "").splitlines():
        m = _TRACE_LINE.match(line)
        if m and m["event"] == EVENT:
            out.append((m["comm"].strip(), line.strip()))
    return out


def _ours(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(rf"^[pr]\S*:(kprobes/)?{EVENT}\s", ln)]


def _failed(what: str, code: int, out: str) -> str:
    return f"step_{what} exited with {code}: {out.strip()[-800:]}" if code else ""


def _cleanup(ctx: LabContext) -> None:
    t = ctx.target
    with contextlib.suppress(Exception):
        if _read(ctx, f"{EVDIR}/enable") is not None:
            t.write_file(f"{EVDIR}/enable", b"0")
            t.write_file(f"{TRACING}/kprobe_events", f"-:kprobes/{EVENT}\n".encode(), mode="a")
    with contextlib.suppress(Exception):
        t.write_file(f"{TRACING}/trace", b"")


def run(ctx: LabContext, g: Grader) -> None:
    t = ctx.target
    symbol = wrapper_symbol(t.arch)
    calls = MIN_CALLS + secrets.randbelow(MAX_CALLS - MIN_CALLS + 1)
    _cleanup(ctx)  # an event of that name left by an interrupted check
    # Other tools' events, as on a real machine: the student's steps must leave them alone.
    others = evidence.define_others(t)
    ctx.cleanups.append(lambda: evidence.remove_others(t, others))
    before = _read(ctx, f"{TRACING}/kprobe_events") or ""
    ctx.cleanups.append(lambda: _cleanup(ctx))
    t.write_file(SCRIPT, ctx.files["events.sh"].encode())

    code, out = _step(ctx, "define")
    after_define = _read(ctx, f"{TRACING}/kprobe_events") or ""
    if gone := evidence.missing_others(after_define, others):
        g.fail(
            "define",
            f"step_define deleted the events other tools had defined ({', '.join(o.shown for o in gone)}): "
            "`>` truncates kprobe_events, which removes every event in it; append with `>>`",
        )
        return
    lines = _ours(after_define)
    good = [ln for ln in lines if ln.split()[0] == f"p:kprobes/{EVENT}" and ln.split()[1] == symbol]
    if not good:
        err = (_read(ctx, f"{TRACING}/error_log") or "").strip().splitlines()[-3:]
        g.fail(
            "define",
            (f"kprobe_events has {'; '.join(lines)}" if lines else f"no {EVENT} in kprobe_events")
            + f" (want p:kprobes/{EVENT} {symbol}). "
            + _failed("define", code, out)
            + ("\nerror_log: " + "\n".join(err) if err else ""),
        )
        return
    exists = _read(ctx, f"{EVDIR}/enable") is not None
    g.result(
        "define", exists, f"kprobe_events: {good[0]}; events/kprobes/{EVENT}/ " + ("exists" if exists else "is missing")
    )
    if not exists:
        return

    code, out = _step(ctx, "filter")
    filt = (_read(ctx, f"{EVDIR}/filter") or "").strip()
    code_en, out_en = _step(ctx, "enable")
    enabled = (_read(ctx, f"{EVDIR}/enable") or "").strip()
    entry = probe_entry(ctx, "k", symbol)
    armed = entry is not None and "[DISABLED]" not in entry[3]
    g.result(
        "enable",
        enabled == "1" and armed,
        f"enable reads {enabled or 'nothing'}; kprobes/list: {' '.join(entry) if entry else 'no probe'} "
        + _failed("enable", code_en, out_en),
    )
    t.write_file(f"{TRACING}/trace", b"")
    guest_run(t, ["/bin/sh", "-c", "echo decoy > /dev/null"], ctx.log)  # a write() the filter must drop
    wcode, wout = guest_run(t, [WORKLOAD, "write", str(calls)], ctx.log)
    events = _events(ctx)
    kblab = [ln for comm, ln in events if comm == WORKLOAD_COMM]
    strangers = sorted({comm for comm, _ in events if comm != WORKLOAD_COMM})
    if wcode != 0:
        g.fail("filter", f"the workload failed ({wcode}): {wout}")
        return
    if g.ready("filter", "enable"):
        g.result(
            "filter",
            filt != "none" and not strangers and len(kblab) > 0,
            f"filter file: {filt}; recorded events "
            + (
                f"from {', '.join(strangers)} ({len(events) - len(kblab)} not from kblab)"
                if strangers
                else "from kblab only"
            )
            + " "
            + _failed("filter", code, out),
        )
    if g.ready("trace", "enable"):
        g.result(
            "trace",
            len(kblab) == calls,
            f"{len(kblab)} {EVENT} events from kblab in trace (the workload made {calls} write() calls)",
        )
    if g.ready("read", "trace"):
        code, out = _step(ctx, "read")
        shown = set(ln.strip() for ln in out.splitlines())
        missing = [ln for ln in kblab if ln not in shown]
        g.result(
            "read",
            not missing,
            f"step_read printed {len(kblab) - len(missing)} of the {len(kblab)} "
            f"recorded events"
            + (f"; missing e.g. {missing[0]!r}" if missing else "")
            + " "
            + _failed("read", code, out),
        )

    code, out = _step(ctx, "disable")
    enabled = (_read(ctx, f"{EVDIR}/enable") or "").strip()
    n_before = len(_events(ctx))
    guest_run(t, [WORKLOAD, "write", str(calls)], ctx.log)
    n_after = len(_events(ctx))
    g.result(
        "disable",
        enabled == "0" and n_after == n_before,
        f"enable reads {enabled or 'nothing'}; {n_after - n_before} events recorded by a workload run after "
        "step_disable " + _failed("disable", code, out),
    )
    if not g.ready("remove", "disable"):
        return
    code, out = _step(ctx, "remove")
    left = _ours(_read(ctx, f"{TRACING}/kprobe_events") or "")
    removed = _read(ctx, f"{EVDIR}/enable") is None
    g.result(
        "remove",
        not left and removed,
        ("kprobe_events still has " + "; ".join(left) if left else f"no {EVENT} in kprobe_events")
        + ("" if removed else f"; events/kprobes/{EVENT}/ still exists")
        + " "
        + _failed("remove", code, out),
    )
    if not g.ready("clean", "remove"):
        return
    after = _read(ctx, f"{TRACING}/kprobe_events") or ""
    gone = evidence.missing_others(after, others)
    was, now = set(before.splitlines()), set(after.splitlines())
    extra = sorted(now - was)
    detail = "kprobe_events is as before: the other tools' events are untouched"
    if gone:
        detail = (
            f"step_remove deleted the events other tools had defined ({', '.join(o.shown for o in gone)}): "
            "remove only yours, with -:kprobes/" + EVENT
        )
    elif extra or was - now:
        detail = "kprobe_events changed: " + "; ".join(
            [f"left behind {ln}" for ln in extra] + [f"missing {ln}" for ln in sorted(was - now)]
        )
    g.result("clean", not gone and now == was, detail)
