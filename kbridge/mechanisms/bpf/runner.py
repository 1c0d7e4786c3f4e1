#!/usr/bin/python3
"""kbridge's guest-side bcc runner: compile, attach, stream hits, report counts, detach.

Usage (inside the bcc root filesystem, as root):
    bpf_runner.py PLAN.json            one run, then exit
    bpf_runner.py --serve PLAN.json    that run, then stay: SIGUSR1 = run PLAN.json again
                                       (rewritten by then), SIGTERM = exit
PLAN (written by kbridge.mechanisms.bpf from kbridge.mechanisms.bpf.render): the BPF C
text, the attach plan, argument names, tgids to exclude and the output port.
Every output line goes to PLAN["port"] (a virtio-serial port the host reads):
{"ev": "ready"|"error"|"end", "run": RUN, ...} as JSON, and each hit as
"H<RUN> <base64 of the raw perf event>" (kbridge.mechanisms.bpf.collect decodes it). SIGINT stops
a run: probes are detached first, then the perf buffer is drained, then the
exact counts and the lost-event count are reported.

A serving runner (on a kept VM) keeps bcc imported and each compiled program,
by the hash of its text, with its probes detached between runs: a repeated
probe skips the 1 s import and the 5-50 s clang compile. It waits in sigwait
between runs (no wakeups, nothing for a probe to see) and writes its pid and
its own hash to SERVE_PID for the next kbridge command.
"""

import binascii
import contextlib
import ctypes
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback

HANDLERS = ("pre", "post", "entry", "ret")
# Per-CPU perf buffer pages (32 MiB): a burst of hits (~100 bytes each) waits there while
# the runner streams them (~9k/s under TCG); 64 pages lost 97 % of a 200k-hit run, 1024 55 %.
PAGES = 8192
SERVE_PID = "/run/kbridge/bpf-runner.pid"
# Compiled programs a serving runner keeps (the least recently used goes first): each holds
# its perf buffer, and a guest short of memory compiles the next program far slower.
KEEP_PROGRAMS = 2

_compiled = {}  # text hash -> _Program, kept by a serving runner


class _Program:
    """A compiled program, its perf buffer opened once, the current run's callbacks."""

    def __init__(self, b, pages):
        self.b = b
        self.on_event = None
        self.on_lost = None
        b["events"].open_perf_buffer(
            lambda cpu, data, size: self.on_event(cpu, data, size), page_cnt=pages, lost_cb=lambda n: self.on_lost(n)
        )


def run_plan(plan, stop, bpf_class, import_s, keep):
    """One run of PLAN; the exit status one-shot mode returns."""
    with open(plan["port"], "wb", buffering=1 << 16) as out:
        return _run(plan, out, stop, bpf_class, import_s, keep)


def layout_of(table):
    """The perf event struct as [name, offset, struct format, count]: the host decodes raw hits with it."""
    cls = type(table.event(ctypes.create_string_buffer(4096)))
    fields = []
    for name, ctype in cls._fields_:
        n = 1
        if issubclass(ctype, ctypes.Array):
            ctype, n = ctype._type_, ctype._length_
        if ctype is ctypes.c_char:
            code = "s"
        else:
            code = {1: "b", 2: "h", 4: "i", 8: "q"}[ctypes.sizeof(ctype)]
            code = code if ctype(-1).value < 0 else code.upper()
        fields.append([name, getattr(cls, name).offset, code, n])
    return {"size": ctypes.sizeof(cls), "fields": fields}


def _run(plan, out, stop, bpf_class, import_s, keep):
    run = plan["run"]

    def emit(ev, **fields):
        out.write((json.dumps({"ev": ev, "run": run, **fields}) + "\n").encode())
        out.flush()

    key = hashlib.sha256(plan["text"].encode()).hexdigest()
    t0 = time.monotonic()
    prog = _compiled.get(key)
    cached = prog is not None
    if prog is None:
        # clang's diagnostics go to fd 2: kept for the error message (a kept runner's
        # stderr is never read).
        with tempfile.TemporaryFile() as diag:
            saved = os.dup(2)
            os.dup2(diag.fileno(), 2)
            try:
                prog = _Program(bpf_class(text=plan["text"]), plan.get("pages", PAGES))
            except Exception as e:  # noqa: BLE001 - bcc raises plain Exception for compile errors
                failure = str(e)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            if prog is None:
                diag.seek(0)
                emit("error", stage="compile", message=failure, stderr=diag.read().decode(errors="replace")[-4000:])
                return 3
    b = prog.b
    t_compile = time.monotonic() - t0
    attached = []
    a = None
    try:
        prog.on_event, prog.on_lost = (lambda cpu, data, size: None), (lambda n: None)
        b.perf_buffer_poll(timeout=0)  # nothing of an earlier run is left to read
        b["counts"].clear()
        excluded = b["excluded"]
        excluded.clear()
        with contextlib.suppress(KeyError):  # a kprobe-only program has no such map
            b["inflight"].clear()  # kretprobe entries of an earlier run
        for pid in plan["exclude"] + [os.getpid()]:
            excluded[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        for a in plan["attach"]:
            if a["type"] == "kprobe":
                b.attach_kprobe(event=a["symbol"], event_off=a.get("offset", 0), fn_name=a["fn"])
            else:
                b.attach_kretprobe(event=a["symbol"], fn_name=a["fn"], maxactive=a.get("maxactive", 0))
            attached.append(a)
    except Exception as e:  # noqa: BLE001 - attach errors are plain Exceptions too
        emit("error", stage="attach", message=str(e), probe=a)
        _compiled.pop(key, None)
        b.cleanup()  # leaves nothing attached
        return 4
    lost = [0]
    # Each hit leaves as "H<run> <base64 of the raw event>": decoding and JSON happen on
    # the host, which is ~50x faster than Python under TCG (1.4k hits/s as JSON here).
    prefix = f"H{run} ".encode()
    string_at, b64, write = ctypes.string_at, binascii.b2a_base64, out.write

    def on_event(cpu, data, size):
        write(prefix + b64(string_at(data, size)))  # flushed after each poll: one port write per batch

    def on_lost(count):
        lost[0] += count

    prog.on_event, prog.on_lost = on_event, on_lost
    emit(
        "ready",
        import_s=round(import_s, 3),
        compile_s=round(t_compile, 3),
        cached=cached,
        layout=layout_of(b["events"]),
    )
    try:
        while not stop:
            b.perf_buffer_poll(timeout=50)
            out.flush()
        # Detach first so no new hit arrives, then drain what is already in the buffer.
        for a in attached:
            if a["type"] == "kprobe":
                b.detach_kprobe(event=a["symbol"], fn_name=a["fn"])
            else:
                b.detach_kretprobe(event=a["symbol"], fn_name=a["fn"])
        attached.clear()
        for _ in range(3):
            b.perf_buffer_poll(timeout=10)
        counts = b["counts"]
        emit("end", counts={HANDLERS[i]: int(counts[ctypes.c_int(i)].value) for i in range(4)}, lost=lost[0], kept=keep)
    except Exception:  # noqa: BLE001
        emit("error", stage="run", message=traceback.format_exc()[-2000:])
        _compiled.pop(key, None)
        b.cleanup()
        return 5
    if keep:
        _compiled.pop(key, None)
        _compiled[key] = prog  # the most recently used last
        while len(_compiled) > KEEP_PROGRAMS:
            _compiled.pop(next(iter(_compiled))).b.cleanup()
    else:
        b.cleanup()
    return 0


def main():
    serve = sys.argv[1] == "--serve"
    plan_path = sys.argv[-1]
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    if serve:
        # Queued until sigwait takes them: a request sent while a run ends is not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    t0 = time.monotonic()
    try:
        from bcc import BPF
    except Exception as e:  # noqa: BLE001 - report whatever broke the import
        with open(plan_path) as f:
            plan = json.load(f)
        with open(plan["port"], "w") as out:
            out.write(
                json.dumps(
                    {"ev": "error", "run": plan["run"], "stage": "import", "message": f"{type(e).__name__}: {e}"}
                )
                + "\n"
            )
        return 2
    import_s = time.monotonic() - t0
    if serve:
        with open(__file__, "rb") as f:
            me = hashlib.sha256(f.read()).hexdigest()
        with open(SERVE_PID + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {me}\n")
        os.replace(SERVE_PID + ".tmp", SERVE_PID)
    while True:
        with open(plan_path) as f:
            plan = json.load(f)
        stop.clear()
        status = run_plan(plan, stop, BPF, import_s, serve)
        if not serve:
            return status
        import_s = 0.0
        if signal.sigwait({signal.SIGUSR1, signal.SIGTERM}) == signal.SIGTERM:
            for prog in _compiled.values():
                prog.b.cleanup()
            return 0


if __name__ == "__main__":
    sys.exit(main())
