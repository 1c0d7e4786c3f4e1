#!/usr/bin/python3
"""kbridge's guest-side bcc runner: compile, attach, stream hits, report counts, detach.

Usage (inside the bcc root filesystem, as root): bpf_runner.py PLAN.json
PLAN (written by kbridge.mechanisms.bpf from kbridge.render.bcc): the BPF C
text, the attach plan, argument names, tgids to exclude and the output port.
Every output line is one JSON object on PLAN["port"] (a virtio-serial port the
host reads): {"ev": "ready"|"hit"|"error"|"end", "run": RUN, ...}. SIGINT or
SIGTERM stops it: probes are detached first, then the perf buffer is drained,
then the exact counts and the lost-event count are reported.
"""

import ctypes
import json
import os
import signal
import sys
import time
import traceback

HANDLERS = ("pre", "post", "entry", "ret")


def main() -> int:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    out = open(plan["port"], "w", buffering=1)  # line buffered: each hit leaves at once
    run = plan["run"]

    def emit(ev, **fields):
        out.write(json.dumps({"ev": ev, "run": run, **fields}) + "\n")

    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    t0 = time.monotonic()
    try:
        from bcc import BPF
    except Exception as e:  # noqa: BLE001 - report whatever broke the import
        emit("error", stage="import", message=f"{type(e).__name__}: {e}")
        return 2
    t_import = time.monotonic() - t0
    try:
        b = BPF(text=plan["text"])
    except Exception as e:  # noqa: BLE001 - bcc raises plain Exception for compile errors
        emit("error", stage="compile", message=str(e))
        return 3
    t_compile = time.monotonic() - t0 - t_import
    try:
        excluded = b["excluded"]
        for pid in plan["exclude"] + [os.getpid()]:
            excluded[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        for a in plan["attach"]:
            if a["type"] == "kprobe":
                b.attach_kprobe(event=a["symbol"], event_off=a.get("offset", 0), fn_name=a["fn"])
            else:
                b.attach_kretprobe(event=a["symbol"], fn_name=a["fn"], maxactive=a.get("maxactive", 0))
    except Exception as e:  # noqa: BLE001 - attach errors are plain Exceptions too
        emit("error", stage="attach", message=str(e), probe=a)
        b.cleanup()  # leaves nothing attached
        return 4
    names = plan["args"]
    lost = [0]

    def on_event(cpu, data, size):
        ev = b["events"].event(data)
        hit = {"h": HANDLERS[ev.handler], "pid": ev.pid, "tid": ev.tid, "cpu": ev.cpu, "ts": ev.ts / 1e9,
               "comm": ev.comm.decode(errors="replace"),
               "args": {n: int(ev.args[i]) for i, n in enumerate(names)}}
        if hit["h"] == "ret":
            hit["ret"] = int(ev.ret)
        emit("hit", **hit)

    def on_lost(count):
        lost[0] += count

    b["events"].open_perf_buffer(on_event, page_cnt=plan.get("pages", 64), lost_cb=on_lost)
    emit("ready", import_s=round(t_import, 3), compile_s=round(t_compile, 3))
    try:
        while not stop:
            b.perf_buffer_poll(timeout=50)
        # Detach first so no new hit arrives, then drain what is already in the buffer.
        for a in plan["attach"]:
            if a["type"] == "kprobe":
                b.detach_kprobe(event=a["symbol"], fn_name=a["fn"])
            else:
                b.detach_kretprobe(event=a["symbol"], fn_name=a["fn"])
        for _ in range(3):
            b.perf_buffer_poll(timeout=10)
        counts = b["counts"]
        emit("end", counts={HANDLERS[i]: int(counts[ctypes.c_int(i)].value) for i in range(4)}, lost=lost[0])
    except Exception:  # noqa: BLE001
        emit("error", stage="run", message=traceback.format_exc()[-2000:])
        return 5
    finally:
        b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
