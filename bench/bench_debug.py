#!/usr/bin/env python3
"""What the debug kernel's checkers cost: Debian's kernel vs `--kernel debug`, in one run, interleaved.

For each arch and each kernel: a boot to the guest agent (saved states off: every start is a real
boot), a warm `kbridge probe ksys_write --pre --arg fd=1 --arg count=3` round trip on a kept VM
(the module already built, hits checked exact), and the guest's cost of one 1-byte write(2) (dd,
100000 of them, timed by the guest's clock). Medians of RUNS rounds; machines here are shared and
noisy: read the ratios of one run.

    python bench/bench_debug.py [--arch x86_64 --arch arm64] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

KERNELS = ("bookworm", "debug")
WRITES = 100000


def kbridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kbridge", *args], capture_output=True, text=True, timeout=1800)


def ok(res: subprocess.CompletedProcess[str]) -> str:
    if res.returncode != 0:
        raise SystemExit(f"{res.args}: {res.stderr.strip()[-800:]}")
    return res.stdout


def boot(arch: str, kernel: str) -> float:
    """Seconds of `kbridge vm up` (no saved state), the image built."""
    kbridge("vm", "down", "--arch", arch, "--kernel", kernel)
    t = time.perf_counter()
    ok(kbridge("vm", "up", "--arch", arch, "--kernel", kernel))
    return time.perf_counter() - t


def probe_round_trip(arch: str, kernel: str) -> float:
    args = ("probe", "ksys_write", "--pre", "--arg", "fd=1", "--arg", "count=3", "--comm", "sh")
    run = ("--arch", arch, "--kernel", kernel, "--run", "echo hi > /tmp/x", "--json")
    ok(kbridge(*args, *run))  # the module built and the symbol table read
    t = time.perf_counter()
    out = ok(kbridge(*args, *run))
    elapsed = time.perf_counter() - t
    hits = [json.loads(ln) for ln in out.splitlines() if '"handler"' in ln]
    assert [h["args"] for h in hits] == [{"fd": 1, "count": 3}], hits  # exact on both
    return elapsed


def write_cost_us(arch: str, kernel: str) -> float:
    """Microseconds of one 1-byte write(2) in the guest, from the guest's own clock around dd."""
    script = (
        "read t0 _ < /proc/uptime; "
        f"dd if=/dev/zero of=/dev/null bs=1 count={WRITES} status=none; "
        "read t1 _ < /proc/uptime; echo $t0 $t1"
    )
    text = ok(kbridge("vm", "exec", "--arch", arch, "--kernel", kernel, "--", "/bin/sh", "-c", script))
    t0, t1 = (float(x) for x in text.split()[-2:])
    return (t1 - t0) / WRITES * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    os.environ["KBRIDGE_SNAPSHOT"] = "0"
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for arch in opts.arch or ["x86_64"]:
        res = results[arch] = {k: {"boot_s": [], "probe_s": [], "write_us": []} for k in KERNELS}
        for _ in range(opts.runs):
            for kernel in KERNELS:  # interleaved: both see the same host load
                res[kernel]["boot_s"].append(boot(arch, kernel))
                res[kernel]["probe_s"].append(probe_round_trip(arch, kernel))
                res[kernel]["write_us"].append(write_cost_us(arch, kernel))
        for kernel in KERNELS:
            kbridge("vm", "down", "--arch", arch, "--kernel", kernel)
    if opts.json:
        print(json.dumps(results, indent=1))
        return
    for arch, res in results.items():
        print(f"{arch} (medians of {opts.runs}; load {os.getloadavg()[0]:.1f} at the end)")
        for what in ("boot_s", "probe_s", "write_us"):
            stock, debug = (statistics.median(res[k][what]) for k in KERNELS)
            runs = " ".join(f"{x:.2f}" for x in res["debug"][what])
            print(f"  {what:9} stock {stock:8.2f}  debug {debug:8.2f}  x{debug / stock:4.1f}   (debug runs: {runs})")


if __name__ == "__main__":
    main()
