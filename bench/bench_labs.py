#!/usr/bin/env python3
"""Grading a class of 30 kprobe-module submissions: `kbridge lab check --jobs 1` vs `--jobs 2`, per arch.

The class: 22 honest solutions (some written differently: other names, extra prints), 3 with one
bug each, a fake (handlers that do nothing, init setting the numbers), a submission that oopses the
kernel, a skeleton, one whose pre-handler returns non-zero, and one that does not compile. Every
source differs (a comment naming its student), so nothing comes from the build cache, as in a real
class. Each run boots its own VMs (a state directory of its own: no kept VM), and the two runs must
give the same result per check. Machines here are shared and noisy: read the ratio.

    python bench/bench_labs.py [--arch x86_64 --arch arm64] [--students 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kbridge.labs import get, labdir

HONEST_EDITS = [
    (),
    (("handler_pre", "on_entry"), ("handler_post", "after_step")),
    (("\tatomic_inc(&pre_count);\n", '\tatomic_inc(&pre_count);\n\tpr_info("hit from %s\\n", current->comm);\n'),),
]
BUGGY = [
    ("\tatomic_inc(&pre_count);\n", "\tatomic_inc(&pre_count);\n\tatomic_inc(&pre_count);\n"),
    ("p->addr = 0x%px", "p->addr = 0x%p"),
    ("last_post_ip = instruction_pointer(regs);", "last_post_ip = last_pre_ip;"),
    ("\tif (!wanted())\n\t\treturn 0;\n", "\treturn 0;\n"),  # a pre-handler that does nothing
    (
        "\tatomic_inc(&pre_count);\n",
        "\tatomic_inc(&pre_count);\n\tif (atomic_read(&pre_count) == 3)\n\t\t*(volatile int *)p->symbol_name = 0;\n",
    ),
    ("\treturn 0;\n}\n\n/* Runs after", "\treturn 1;\n}\n\n/* Runs after"),  # pre-handler returns non-zero
    ("\tatomic_inc(&post_count);\n", "\tatomic_inc(&post_count)\n"),  # does not compile
]


def make_class(root: Path, students: int) -> list[Path]:
    lab = get("kprobe-module")
    dirs = []
    for i in range(students):
        d = root / f"s{i:02d}" / "kprobe-module"
        bad = i - (students - len(BUGGY) - 1)
        labdir.write(lab, d, "skeleton" if bad == len(BUGGY) else "solution")
        src = d / "kprobe_lab.c"
        text = src.read_text() + f"/* student {i:02d} */\n"
        if bad == len(BUGGY):
            edits = []
        elif 0 <= bad < len(BUGGY):
            edits = [BUGGY[bad]]
        else:
            edits = list(HONEST_EDITS[i % len(HONEST_EDITS)])
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new)
        src.write_text(text)
        dirs.append(d)
    return dirs


def grade(dirs: list[Path], arch: str, jobs: int, state: Path) -> tuple[float, list[dict]]:
    env = {**os.environ, "KBRIDGE_STATE": str(state)}
    argv = [sys.executable, "-m", "kbridge", "lab", "check", "--arch", arch, "--jobs", str(jobs), "--json"]
    t = time.perf_counter()
    res = subprocess.run([*argv, *map(str, dirs)], capture_output=True, text=True, env=env)
    took = time.perf_counter() - t
    if res.returncode not in (0, 1):
        raise SystemExit(f"kbridge lab check failed ({res.returncode}): {res.stderr[-2000:]}")
    return took, [json.loads(line) for line in res.stdout.splitlines()]


def verdicts(reports: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    return [(Path(r["directory"]).parent.name, tuple(c["status"] for c in r["checks"])) for r in reports]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="x86_64 and/or arm64 (default: both)")
    ap.add_argument("--students", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbbench-") as tmp:
        dirs = make_class(Path(tmp) / "class", args.students)
        print(f"class of {len(dirs)} kprobe-module submissions, {os.cpu_count()} cores")
        print(f"{'arch':<8} {'--jobs 1':>10} {'--jobs 2':>10} {'ratio':>7}  per submission (1 / 2)  all passed")
        for arch in args.arch or ["x86_64", "arm64"]:
            times, results = {}, {}
            for jobs in (1, 2):
                times[jobs], reports = grade(dirs, arch, jobs, Path(tmp) / f"state-{arch}-{jobs}")
                results[jobs] = verdicts(reports)
            if results[1] != results[2]:
                diff = [(a, b) for a, b in zip(results[1], results[2], strict=True) if a != b]
                raise SystemExit(f"{arch}: --jobs 1 and --jobs 2 disagree: {diff}")
            ok = sum(all(s == "pass" for s in st) for _, st in results[1])
            n = len(dirs)
            print(
                f"{arch:<8} {times[1]:>9.0f}s {times[2]:>9.0f}s {times[1] / times[2]:>6.2f}x  "
                f"{times[1] / n:.1f} s / {times[2] / n:.1f} s          {ok}/{n}"
            )


if __name__ == "__main__":
    main()
