"""Benchmark the tracefs mechanism on a kept VM.

    KBRIDGE_STATE=... python bench/bench_tracefs.py --arch x86_64 [--calls 20000]

Prints:
* first event: wall time from starting `kbridge trace` (the CLI, as a user
  runs it, with the VM already up) to its first event on stdout;
* throughput: events per second read from trace_pipe and parsed on the host,
  from the first to the last event of a `dd bs=1` run, with the number lost
  (0 is the point: the rate is the one sustained without loss).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from kbridge.arch import get_arch
from kbridge.mechanisms import tracefs
from kbridge.session import Session
from kbridge.spec import Hit
from kbridge.targets.qemu import QemuVM
from kbridge.workload import Workload


def first_event(arch: str, runs: int) -> list[float]:
    """Seconds from `kbridge trace` start to its first JSON event line."""
    out = []
    for _ in range(runs):
        start = time.monotonic()
        proc = subprocess.Popen(
            [
                "kbridge",
                "trace",
                "--arch",
                arch,
                "--json",
                "--count",
                "1",
                "--run",
                "echo kbridge-bench",
                "p:kbbench/w ksys_write fd=$arg1:u64 count=$arg3:u64",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=os.environ,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        elapsed = time.monotonic() - start
        proc.wait(timeout=120)
        if '"event"' not in line:
            raise SystemExit(f"no event from kbridge trace: {line!r}")
        out.append(elapsed)
    return out


def throughput(arch: str, calls: int) -> tuple[int, int, float, float]:
    """(read, lost, seconds from first to last event on the host, workload seconds)."""
    vm = QemuVM.attach(get_arch(arch))
    if vm is None:
        raise SystemExit(f"no kept {arch} VM: start one with `kbridge vm up --arch {arch}`")
    times: list[float] = []

    def on_hit(hit: Hit) -> None:
        times.append(time.monotonic())

    try:
        res = tracefs.run_lines(
            Session(vm),
            ["p:kbbench/w ksys_write fd=$arg1:u64 count=$arg3:u64"],
            Workload.shell(f"dd if=/dev/zero of=/dev/null bs=1 count={calls} 2>/dev/null"),
            on_hit=on_hit,
            filter="fd == 1",
            comm="dd",
        )
    finally:
        vm.detach()
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    ts = [h.timestamp for h in res.hits if h.timestamp is not None]
    guest_span = (max(ts) - min(ts)) if len(ts) > 1 else float("nan")
    return res.total, res.lost, span, guest_span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="x86_64")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    firsts = first_event(args.arch, args.runs)
    print(
        f"first event ({args.arch}, VM kept up): "
        f"min {min(firsts):.3f} s, median {sorted(firsts)[len(firsts) // 2]:.3f} s over {args.runs} runs"
    )
    read, lost, span, guest_span = throughput(args.arch, args.calls)
    print(
        f"throughput ({args.arch}): {read} events read, {lost} lost, "
        f"{read / span:,.0f} events/s on the host over {span:.2f} s "
        f"(the guest produced them in {guest_span:.2f} s)"
    )


if __name__ == "__main__":
    main()
