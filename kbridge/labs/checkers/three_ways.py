"""three-ways: the student's module, tracefs event and eBPF program on ksys_write, run at once
on one workload, and the student's explanation of what each counted, against the kernel's numbers."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

from kbridge import kprobe_events
from kbridge.errors import KbridgeError
from kbridge.labs.checkers.common import build_and_load
from kbridge.labs.context import LabContext
from kbridge.labs.grading import CheckSpec, Grader
from kbridge.labs.guest import GUEST_DIR, WORKLOAD, guest_run
from kbridge.labs.kmodule import int_state
from kbridge.targets.base import GuestIOError

MODULE = "three_lab"
SYMBOL = "ksys_write"
CALLS = 2000
BUFFER_KB = 4  # per CPU: far too small for CALLS events, on purpose
TRACING = "/sys/kernel/tracing"
STATE = f"/sys/kernel/debug/{MODULE}/state"
BPF_READY_S = 240.0  # bcc import + clang under TCG: ~10 s on x86_64, much more on emulated arm64
QUESTIONS = ("same_count", "trace_complete", "trace_lost", "profile_larger")

CHECKS = [
    CheckSpec(
        "builds",
        "three_lab.c compiles against the guest kernel's headers",
        "fix the compiler errors shown, at the line they name",
    ),
    CheckSpec(
        "loads",
        "insmod succeeds and the module is in /proc/modules",
        "insmod runs your init function: it returns 0 once register_kprobe(&kp) succeeded, and register_kprobe()'s "
        "error otherwise, so that insmod fails with it",
    ),
    CheckSpec(
        "module-count",
        f"the module counted every ksys_write() of the workload ({CALLS})",
        'count in the pre-handler when current->comm is "kblab"',
    ),
    CheckSpec(
        "event",
        "event.txt's line defines a kprobe event on ksys_write, and its filter is accepted",
        'event = p:GROUP/NAME ksys_write ; filter = an expression over the event\'s fields, e.g. comm == "kblab"',
    ),
    CheckSpec(
        "event-count",
        f"the event was written once per call of the workload ({CALLS}; the trace header's entries-written)",
        "enable needs the filter to keep kblab's events only",
    ),
    CheckSpec(
        "bpf-attach",
        "bcc compiles three_bpf.c and attaches count_write to ksys_write",
        "bcc's compiler errors are shown above; the function must be int count_write(struct pt_regs *ctx)",
    ),
    CheckSpec(
        "bpf-count",
        f"the eBPF program counted every call of the workload in counts[0] ({CALLS})",
        'bpf_get_current_comm() then compare with "kblab" and counts.increment(0)',
    ),
    CheckSpec("answers", "answers.txt answers every question", "write yes/no (or the word asked for) after each '='"),
    CheckSpec(
        "same-count",
        "same_count matches whether the three counts were equal",
        "each mechanism counts in the kernel as the probe fires (an atomic, a ring-buffer write, a "
        "map update): none of them loses a count, whatever happens to the output afterwards",
    ),
    CheckSpec(
        "trace-complete",
        "trace_complete matches whether the trace buffer still holds every event",
        "the trace header says entries-in-buffer/entries-written: a 4 KiB buffer holds a few hundred",
    ),
    CheckSpec(
        "trace-lost",
        "trace_lost names what happened to the events the buffer lost",
        "in overwrite mode (the default) a full ring buffer overwrites its oldest events: "
        "per_cpu/cpu0/stats counts them as overrun",
    ),
    CheckSpec(
        "profile-larger",
        "profile_larger matches kprobe_profile against the module's count",
        "kprobe_profile counts every hit of the event's kprobe, before the filter drops other tasks' write() calls",
    ),
]

_LINE = re.compile(r"^\s*(?P<key>\w+)\s*=(?P<value>.*)$")


def parse_keys(text: str) -> dict[str, str]:
    """'key = value' lines (comments ignored; the value is everything after the first '=')."""
    out = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if m and m["value"].strip():
            out[m["key"]] = m["value"].strip()
    return out


def _read(ctx: LabContext, path: str) -> str:
    try:
        return ctx.target.read_file(path).decode(errors="replace")
    except GuestIOError:
        return ""


def run(ctx: LabContext, g: Grader) -> None:
    t = ctx.target
    python = t.bcc_python()
    assert python is not None  # the runner only starts this lab in a guest with bcc
    keys = parse_keys(ctx.files["event.txt"])
    ev: kprobe_events.ProbeEvent | None = None
    why = ""
    try:
        parsed = kprobe_events.parse(keys.get("event", ""), ctx.session.grammar)
        if not isinstance(parsed, kprobe_events.ProbeEvent) or parsed.kind != "p" or parsed.symbol != SYMBOL:
            why = f"{keys.get('event', '')!r} is not a kprobe (p:) event on {SYMBOL}"
        else:
            ev = parsed
    except KbridgeError as e:
        why = f"event = {keys.get('event', '')!r}: {e.message}"
    filt = keys.get("filter", "")
    if "\n" in filt or "\0" in filt:
        why = "the filter must be one line"

    # The eBPF program, attached by bcc in the guest (the runner reports through files in GUEST_DIR);
    # started first, so bcc's compile in the guest overlaps the module's build on the host.
    t.write_file(f"{GUEST_DIR}/three_bpf.c", ctx.files["three_bpf.c"].encode())
    t.write_file(f"{GUEST_DIR}/bpf_count.py", (Path(__file__).resolve().parent.parent / "bpf_count.py").read_bytes())
    handle = t.spawn([*python, f"{GUEST_DIR}/bpf_count.py", f"{GUEST_DIR}/three_bpf.c", GUEST_DIR])

    def stop_bpf() -> None:
        with contextlib.suppress(Exception):
            t.run(["/bin/busybox", "kill", "-9", str(t.guest_pid(handle))], timeout=10)
            t.wait(handle, timeout=10)

    ctx.cleanups.append(stop_bpf)

    lm = build_and_load(ctx, g, MODULE)
    evdir = f"{TRACING}/events/{ev.effective_group}/{ev.effective_event}" if ev else ""
    old_kb = _read(ctx, f"{TRACING}/buffer_size_kb")
    m = re.search(r"expanded:\s*(\d+)", old_kb)
    restore_kb = (m.group(1) if m else old_kb.split()[0]) if old_kb else ""

    def undo_event() -> None:
        if ev is not None and _read(ctx, f"{evdir}/enable"):
            with contextlib.suppress(Exception):
                t.write_file(f"{evdir}/enable", b"0")
            with contextlib.suppress(Exception):
                t.write_file(f"{TRACING}/kprobe_events", f"-:{ev.effective_group}/{ev.effective_event}\n".encode(), "a")
        if restore_kb:
            with contextlib.suppress(Exception):
                t.write_file(f"{TRACING}/buffer_size_kb", restore_kb.encode())

    ctx.cleanups.append(undo_event)
    if ev is not None:
        try:
            t.write_file(f"{TRACING}/kprobe_events", (keys["event"] + "\n").encode(), mode="a")
            if filt:
                t.write_file(f"{evdir}/filter", filt.encode())
        except GuestIOError:
            err = _read(ctx, f"{TRACING}/error_log").strip().splitlines()[-3:]
            why = "the kernel refused it: " + (" ".join(err) or _read(ctx, f"{evdir}/filter").strip())
            ev = None if not _read(ctx, f"{evdir}/enable") else ev
        if ev is not None and not why:
            t.write_file(f"{TRACING}/buffer_size_kb", str(BUFFER_KB).encode())
            t.write_file(f"{TRACING}/trace", b"")
            t.write_file(f"{evdir}/enable", b"1")
    if why:
        g.fail("event", why)
    else:
        g.result("event", True, f"{keys['event']} with filter {filt!r}")

    bpf_error = None
    deadline = time.monotonic() + BPF_READY_S
    while time.monotonic() < deadline:
        if t.run(["/bin/busybox", "test", "-e", f"{GUEST_DIR}/bpf.ready"], timeout=30).ok:
            break
        if (res := t.poll(handle)) is not None:
            bpf_error = json.loads(_read(ctx, f"{GUEST_DIR}/bpf.json") or '{"error": "bcc exited"}').get("error")
            # clang's diagnostics (the student's file and line) go to the runner's stderr.
            diag = res.stderr.decode(errors="replace").replace("/virtual/main.c", "three_bpf.c").strip()
            bpf_error = f"{diag}\n{bpf_error}" if diag else bpf_error
            break
        time.sleep(0.5)
    else:
        bpf_error = f"bcc did not attach within {BPF_READY_S:.0f} s"
    if bpf_error:
        g.fail("bpf-attach", str(bpf_error)[-3000:])
    else:
        g.result("bpf-attach", True, "count_write attached to ksys_write")

    code, out = guest_run(t, [WORKLOAD, "write", str(CALLS)], ctx.log)
    bpf_count = None
    if not bpf_error:
        t.write_file(f"{GUEST_DIR}/bpf.stop", b"")
        t.wait(handle, timeout=60)
        result = json.loads(_read(ctx, f"{GUEST_DIR}/bpf.json") or "{}")
        bpf_count = result.get("count")
        if bpf_count is None:
            g.fail("bpf-count", f"reading counts[0] failed: {result.get('error')}")
    if ev is not None and not why:
        t.write_file(f"{evdir}/enable", b"0")
    if code != 0:
        g.fail("module-count" if lm else "event-count", f"the workload failed ({code}): {out}")
        return

    # What each way counted.
    counts: dict[str, int | None] = {"module": None, "tracefs": None, "bpf": bpf_count}
    if lm is not None:
        counts["module"] = int_state(t, STATE, ("hits",))["hits"]
        g.result("module-count", counts["module"] == CALLS, f"hits = {counts['module']} for {CALLS} calls")
    in_buffer = written = overrun = profile_hits = None
    if g.ready("event-count", "event"):
        assert ev is not None
        head = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", _read(ctx, f"{TRACING}/trace"))
        in_buffer, written = (int(head[1]), int(head[2])) if head else (0, 0)
        counts["tracefs"] = written
        cpus = t.run(["/bin/busybox", "ls", f"{TRACING}/per_cpu"], timeout=30).text.split()
        overrun = sum(
            int(x)
            for cpu in cpus
            for x in re.findall(r"^overrun: (\d+)", _read(ctx, f"{TRACING}/per_cpu/{cpu}/stats"), re.M)
        )
        for line in _read(ctx, f"{TRACING}/kprobe_profile").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == ev.effective_event:
                profile_hits = int(parts[1])
        g.result(
            "event-count",
            written == CALLS,
            f"entries-written {written}, entries-in-buffer {in_buffer}, "
            f"overrun {overrun}; kprobe_profile hits {profile_hits}",
        )
    if bpf_count is not None:
        g.result("bpf-count", bpf_count == CALLS, f"counts[0] = {bpf_count} for {CALLS} calls")

    ans = parse_keys(ctx.files["answers.txt"])
    missing = [q for q in QUESTIONS if q not in ans]
    g.result("answers", not missing, f"unanswered: {', '.join(missing)}" if missing else "all answered")
    if g.ready("same-count", "module-count", "event-count", "bpf-count"):
        same = len({counts["module"], counts["tracefs"], counts["bpf"]}) == 1
        _answer(
            g,
            "same-count",
            ans,
            "same_count",
            "yes" if same else "no",
            f"module {counts['module']}, tracefs {counts['tracefs']}, eBPF {counts['bpf']}",
        )
    if g.ready("trace-complete", "event-count"):
        _answer(
            g,
            "trace-complete",
            ans,
            "trace_complete",
            "yes" if in_buffer == written else "no",
            f"entries-in-buffer {in_buffer} of entries-written {written}",
        )
        lost = "overwritten" if overrun else ("filtered" if (profile_hits or 0) > (written or 0) else "missed")
        _answer(
            g,
            "trace-lost",
            ans,
            "trace_lost",
            lost if in_buffer != written else "none",
            f"per_cpu/cpu*/stats overrun {overrun}",
        )
    if g.ready("profile-larger", "module-count", "event-count"):
        _answer(
            g,
            "profile-larger",
            ans,
            "profile_larger",
            "yes" if (profile_hits or 0) > (counts["module"] or 0) else "no",
            f"kprobe_profile {profile_hits}, module {counts['module']}",
        )
    if lm is not None:
        lm.rmmod()


def _answer(g: Grader, check: str, ans: dict[str, str], key: str, seen: str, how: str) -> None:
    given = ans.get(key, "").lower()
    if not given:
        g.fail(check, f"not answered (the kernel: {seen!r}; {how})")
    else:
        g.result(check, given == seen, f"you answered {given!r}; the kernel: {seen!r} ({how})")
