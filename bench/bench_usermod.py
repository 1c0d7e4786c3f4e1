#!/usr/bin/env python3
"""Speed of testing a user's own module (examples/chardev), per arch.

Prints, for each arch: build uncached (a changed source) vs cached (unchanged),
and the round trip of load + unload in a kept VM (booted first if none runs).
Machines here are shared and noisy: read the ratios, not absolute seconds.

    python bench/bench_usermod.py [--arch x86_64 --arch arm64] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from kbridge import kbuild, modules
from kbridge.arch import get_arch
from kbridge.images import image as images
from kbridge.targets.qemu import QemuVM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chardev"


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(arch_name: str, runs: int) -> None:
    arch = get_arch(arch_name)
    img = images.ensure(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "chardev"
        shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        uncached = []
        for i in range(runs):
            # A new comment is a new source: a new cache key, a real kbuild run.
            with (src / "kbchardev.c").open("a") as f:
                f.write(f"/* bench {time.time_ns()} {i} */\n")
            uncached.append(timed(lambda: kbuild.pick(kbuild.build(kbuild.source_files(src), img, str(src)), str(src))))
        cached = [
            timed(lambda: kbuild.pick(kbuild.build(kbuild.source_files(src), img, str(src)), str(src)))
            for _ in range(runs)
        ]
        built = kbuild.pick(kbuild.build(kbuild.source_files(src), img, str(src)), str(src))
    vm = QemuVM.attach(arch)
    booted = vm is None
    if vm is None:
        vm = QemuVM.boot(img, keep=True)
    try:
        trips = []
        for _ in range(runs):
            t = time.perf_counter()
            modules.load_module(vm, built, {"debug": 1})
            modules.unload_module(vm, built.name)
            trips.append(time.perf_counter() - t)
    finally:
        vm.shutdown() if booted else vm.detach()
    med = statistics.median
    print(
        f"{arch.name:7} build uncached {med(uncached):6.2f} s   cached {med(cached) * 1000:6.1f} ms   "
        f"load+unload {med(trips):5.2f} s   ({vm.accel}, median of {runs})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="x86_64, arm64 (repeatable; default: both)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for a in args.arch or ["x86_64", "arm64"]:
        bench(a, args.runs)


if __name__ == "__main__":
    main()
