"""Guest side of the three-ways lab: the student's eBPF program, compiled and attached by bcc.

Usage (in the bcc root filesystem, as root): bpf_count.py PROGRAM.c DIR
Writes DIR/bpf.ready once attached, waits for DIR/bpf.stop, then writes DIR/bpf.json
({"count": N} or {"error": ...}) and detaches. Runs in the guest's python3, not on the host.
"""

import json
import os
import sys
import time

prog, d = sys.argv[1], sys.argv[2]


def done(obj: dict) -> None:
    with open(os.path.join(d, "bpf.json.tmp"), "w") as f:
        json.dump(obj, f)
    os.rename(os.path.join(d, "bpf.json.tmp"), os.path.join(d, "bpf.json"))


try:
    from bcc import BPF

    with open(prog) as f:
        b = BPF(text=f.read())
    b.attach_kprobe(event="ksys_write", fn_name="count_write")
except Exception as e:  # noqa: BLE001 - whatever bcc raised is reported to the host - bcc raises plain Exception; report it whatever it is
    done({"error": f"{type(e).__name__}: {e}"})
    sys.exit(1)
open(os.path.join(d, "bpf.ready"), "w").close()
deadline = time.monotonic() + 600
while not os.path.exists(os.path.join(d, "bpf.stop")) and time.monotonic() < deadline:
    time.sleep(0.05)
try:
    count = int(b["counts"][0].value)
    done({"count": count})
except Exception as e:  # noqa: BLE001
    done({"error": f"reading counts[0]: {type(e).__name__}: {e}"})
b.cleanup()
