#!/usr/bin/env python3
"""Speed of `kbridge probe` (module path), per arch under this host's accelerator.

Prints, for each arch: cold start (no VM running, image cached) to first hit;
warm round trip (VM kept up, module cached); module build uncached vs cached.
Machines here are shared and noisy: read the ratios, not absolute seconds.

    python bench/bench_probe.py [--arch x86_64 --arch arm64] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from kbridge.arch import get_arch
from kbridge.images import image as images
from kbridge.kbuild import build_generated, cache_key
from kbridge.mechanisms.engine import StopRule
from kbridge.mechanisms.kmod.render import render
from kbridge.paths import cache_dir
from kbridge.probe import probe
from kbridge.spec import make_spec
from kbridge.targets.qemu import QemuVM
from kbridge.workload import Workload

WORKLOAD = Workload(("/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=7", "count=3"), "dd")


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def first_hit_time(arch, spec) -> float:  # type: ignore[no-untyped-def]
    """Seconds from calling probe() to the first hit arriving on the host."""
    start = time.perf_counter()
    seen: list[float] = []
    probe(spec, arch, WORKLOAD, StopRule(count=1), on_hit=lambda h: seen.append(time.perf_counter()))
    return seen[0] - start


def bench(arch_name: str, runs: int) -> dict[str, list[float]]:
    arch = get_arch(arch_name)
    img = images.ensure(arch)
    spec = make_spec("ksys_write", {"pre"}, ["fd=1", "count=3"], arch, comm="dd")
    mod = render(spec, arch)
    out: dict[str, list[float]] = {
        "build_uncached": [],
        "build_cached": [],
        "cold_first_hit": [],
        "warm_round_trip": [],
    }
    for _ in range(runs):
        shutil.rmtree(
            cache_dir() / "kbuild" / cache_key({k: v.encode() for k, v in mod.files.items()}, img), ignore_errors=True
        )
        out["build_uncached"].append(timed(lambda: build_generated(mod.name, mod.files, img)))
        out["build_cached"].append(timed(lambda: build_generated(mod.name, mod.files, img)))
    for _ in range(runs):  # no kept VM: boot + probe + shutdown; the module is cached
        assert QemuVM.attach(arch) is None, "stop the kept VM first (kbridge vm down)"
        out["cold_first_hit"].append(first_hit_time(arch, spec))
    vm = QemuVM.boot(img, keep=True)
    vm.detach()
    try:
        probe(spec, arch, WORKLOAD)  # warm-up
        for _ in range(runs):
            out["warm_round_trip"].append(timed(lambda: probe(spec, arch, WORKLOAD)))
    finally:
        kept = QemuVM.attach(arch)
        if kept:
            kept.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    # A private state dir: the benchmark never touches the user's kept VMs.
    os.environ.setdefault("KBRIDGE_STATE", tempfile.mkdtemp(prefix="kb-bench-"))
    print(f"{'arch':8} {'measure':18} {'median s':>9} {'min s':>7} {'max s':>7}  (runs={args.runs})")
    for name in args.arch or ["x86_64", "arm64"]:
        res = bench(name, args.runs)
        for key, vals in res.items():
            print(f"{name:8} {key:18} {statistics.median(vals):9.3f} {min(vals):7.3f} {max(vals):7.3f}")
        ratio = statistics.median(res["build_uncached"]) / max(statistics.median(res["build_cached"]), 1e-6)
        print(f"{name:8} {'build speedup':18} {ratio:9.0f}x  (uncached / cached)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
