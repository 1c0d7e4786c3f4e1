"""Benchmark: per mechanism, time to first event and per-hit overhead, as ratios to the unprobed workload.

    KBRIDGE_STATE=... python bench/bench_compare.py [--arch x86_64] [--count 1000] [--repeats 5]

Uses kbridge.compare on one VM (the kept one, else a fresh bcc VM): the
unprobed runs and each mechanism's runs are measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import statistics

from kbridge.arch import get_arch
from kbridge.compare import compare, open_compare_target
from kbridge.session import Session
from kbridge.spec import make_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default=None)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    arch = get_arch(a.arch)
    cmd = f"dd if=/dev/zero of=/dev/null bs=1 count={a.count}"
    vm, _ = open_compare_target(arch)
    with vm:
        comp = compare(Session(vm), make_spec("ksys_write", {"pre"}, None, arch, comm="dd"), cmd, a.repeats)
    base = statistics.median(comp.baseline_ns)
    rows = {}
    for name, st in comp.mechanisms.items():
        if st.result is None:
            rows[name] = {"skipped": st.skipped}
            continue
        med = statistics.median(st.durations_ns)
        rows[name] = {
            "hits": st.result.total,
            "first_event_s": st.result.first_event_s,
            "first_event_ratio": round(st.result.first_event_s * 1e9 / base, 3) if st.result.first_event_s else None,
            "run_ratio": round(med / base, 3),
            "overhead_ns_per_hit": st.overhead_ns,
        }
    print(
        json.dumps(
            {
                "arch": comp.arch,
                "accel": comp.accel,
                "workload": cmd,
                "repeats": a.repeats,
                "unprobed_median_ns": base,
                "mechanisms": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
