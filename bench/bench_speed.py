#!/usr/bin/env python3
"""How fast kbridge is next to the floor: raw tracefs by hand through the guest channel.

For each arch, in one run on one guest:

* floor: on a kept VM, through the guest agent, define a kprobe event on
  ksys_write, enable it, run one write, read `trace` back (what a user typing
  the tracefs commands pays, minus typing); then remove it (not timed);
* warm (the VM kept up): `kbridge trace`, `kbridge probe` (kmod), `--via tracefs`
  and `--via bpf` (on the bcc image) run as a user runs them, timed to their
  first hit on stdout and to exit;
* cold (no VM running, image and module cached): `kbridge probe` to first hit;
* `kbridge --help`;
* load: `dd bs=1 count=200000` (--comm dd) through each mechanism: exact hits,
  hits streamed to the host, lost, and events per second streamed (host time
  from the first to the last hit).

Every time is also printed as a ratio to the floor of that arch in that run:
the machines here are shared and noisy, so read the ratios.

    python bench/bench_speed.py [--arch x86_64 --arch arm64] [--runs 3] [--only warm,cold] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kbridge.targets.base import Target

SECTIONS = ("help", "floor", "warm", "cold", "load", "bpf")
FLOOR_EVENT = "kbfloor/w"
ONE_WRITE = "dd if=/dev/zero of=/dev/null bs=7 count=1 2>/dev/null"
KBRIDGE = [str(Path(sys.executable).with_name("kbridge"))]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def child_cpu() -> float:
    """CPU seconds (user + system) of the child processes waited for so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_cli(argv: list[str], timeout: float = 600.0) -> tuple[float, float, str, float]:
    """(seconds to the first hit line on stdout, seconds to exit, that line, CPU seconds of the
    kbridge process) for one kbridge command."""
    cpu0 = child_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen([*KBRIDGE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    first = float("nan")
    line = ""
    for raw in proc.stdout:
        if raw.startswith("{") and '"summary"' not in raw:
            first = time.perf_counter() - start
            line = raw
            break
    _rest, errs = proc.communicate(timeout=timeout)
    total = time.perf_counter() - start
    if proc.returncode != 0 or not line:
        raise SystemExit(f"kbridge {' '.join(argv)} failed ({proc.returncode}): {errs.strip()[-800:]}")
    return first, total, line, child_cpu() - cpu0


def floor_once(vm: Target) -> float:
    """Raw tracefs through the agent: define, enable, one write, read trace. Seconds."""
    tr = "/sys/kernel/tracing"
    start = time.perf_counter()
    vm.write_file(f"{tr}/kprobe_events", f"p:{FLOOR_EVENT} ksys_write\n".encode(), mode="a")
    vm.write_file(f"{tr}/events/{FLOOR_EVENT}/enable", b"1")
    vm.run(["/bin/sh", "-c", ONE_WRITE])
    text = vm.read_file(f"{tr}/trace").decode(errors="replace")
    elapsed = time.perf_counter() - start
    # Not timed: leave the guest as it was found.
    vm.write_file(f"{tr}/events/{FLOOR_EVENT}/enable", b"0")
    vm.write_file(f"{tr}/kprobe_events", f"-:{FLOOR_EVENT}\n".encode(), mode="a")
    vm.write_file(f"{tr}/trace", b"")
    if "dd-" not in text:
        raise SystemExit(f"floor: no dd hit in trace: {text[-400:]!r}")
    return elapsed


# What bcc's own funccount does before it counts (the bcc image has no bcc tools): import
# bcc, compile a one-map counter, attach it to ksys_write.
BCC_BY_HAND = """
from bcc import BPF
b = BPF(text=\"\"\"
BPF_ARRAY(counts, u64, 1);
int f(struct pt_regs *ctx) { int k = 0; u64 *v = counts.lookup(&k); if (v) __sync_fetch_and_add(v, 1); return 0; }
\"\"\")
b.attach_kprobe(event="ksys_write", fn_name="f")
print("ready")
"""


def bcc_by_hand_once(vm: Target) -> float:
    """Seconds for python3 in the guest to import bcc, compile a counter and attach it (funccount's work)."""
    python = vm.bcc_python()
    assert python is not None
    start = time.perf_counter()
    res = vm.run([*python, "-c", BCC_BY_HAND], timeout=900)
    elapsed = time.perf_counter() - start
    if not res.ok or "ready" not in res.text:
        raise SystemExit(f"bcc by hand failed: {(res.stderr or res.stdout).decode(errors='replace')[-500:]}")
    return elapsed


@contextlib.contextmanager
def kept(arch_name: str, flavour: str = "default") -> Iterator[object]:
    """A kept VM of FLAVOUR for the block (booted here), stopped after."""
    from kbridge.arch import get_arch
    from kbridge.targets import resolve_image
    from kbridge.targets.qemu import QemuVM

    arch = get_arch(arch_name)
    if (old := QemuVM.attach(arch)) is not None:
        old.shutdown()
    vm = QemuVM.boot(resolve_image(arch, "bookworm", flavour), keep=True)
    vm.detach()
    try:
        yield vm
    finally:
        if (vm2 := QemuVM.attach(arch)) is not None:
            vm2.shutdown()


def load_run(arch_name: str, via: str, calls: int) -> dict:
    """`dd bs=1 count=CALLS` through VIA on the kept VM: exact hits, streamed, lost, events/s on the host."""
    from kbridge.arch import get_arch
    from kbridge.mechanisms.engine import StopRule
    from kbridge.probe import probe
    from kbridge.spec import make_spec
    from kbridge.workload import Workload

    arch = get_arch(arch_name)
    spec = make_spec("ksys_write", {"pre"}, [], arch, comm="dd")
    times: list[float] = []
    start = time.perf_counter()
    run = probe(
        spec,
        arch,
        Workload.shell(f"dd if=/dev/zero of=/dev/null bs=1 count={calls} 2>/dev/null"),
        StopRule(),
        on_hit=lambda h: times.append(time.perf_counter()),
        via=via,
    )
    wall = time.perf_counter() - start
    r = run.result
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "hits": r.total,
        "streamed": len(r.hits),
        "lost": r.lost,
        "missed": r.missed,
        "events_per_s": round(len(r.hits) / span) if span == span and span > 0 else None,
        "wall_s": round(wall, 2),
        "notes": r.notes,
    }


def warm_rows(arch: str, runs: int, vias: list[str]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    cmds: dict[str, list[str]] = {
        "trace": ["trace", "--arch", arch, "--json", "--comm", "dd", "--run", ONE_WRITE, "p:kbbench/w ksys_write"],
        "probe kmod": ["probe", "ksys_write", "--pre", "--arch", arch, "--json", "--comm", "dd", "--run", ONE_WRITE],
        "probe tracefs": [
            "probe",
            "ksys_write",
            "--pre",
            "--via",
            "tracefs",
            "--arch",
            arch,
            "--json",
            "--comm",
            "dd",
            "--run",
            ONE_WRITE,
        ],
        "probe bpf": [
            "probe",
            "ksys_write",
            "--pre",
            "--via",
            "bpf",
            "--arch",
            arch,
            "--json",
            "--comm",
            "dd",
            "--run",
            ONE_WRITE,
        ],
    }
    for name, argv in cmds.items():
        if ("tracefs" if name == "trace" else name.split()[-1]) not in vias:
            continue
        # The first run builds the module / compiles the bcc program (unless cached from an
        # earlier bench) and translates the guest's code paths for the first time.
        _f0, t0, _line, _c = timed_cli(argv)
        firsts, totals, cpus = [], [], []
        for _ in range(runs):
            f, t, _line, c = timed_cli(argv)
            firsts.append(f)
            totals.append(t)
            cpus.append(c)
        out[name] = {"first_hit_s": firsts, "exit_s": totals, "host_cpu_s": cpus, "first_run_exit_s": [t0]}
    return out


def bench_arch(arch: str, runs: int, sections: set[str], calls: int, log: Callable[[str], None]) -> dict:
    from kbridge.arch import get_arch
    from kbridge.targets.qemu import QemuVM

    res: dict = {"arch": arch}
    if "cold" in sections:
        if (old := QemuVM.attach(get_arch(arch))) is not None:
            old.shutdown()
        argv = ["probe", "ksys_write", "--pre", "--arch", arch, "--json", "--comm", "dd", "--run", ONE_WRITE]
        timed_cli(argv)  # builds/caches the module and, where supported, the saved guest state
        firsts, totals, cpus = [], [], []
        for _ in range(runs):
            f, t, _, c = timed_cli(argv)
            firsts.append(f)
            totals.append(t)
            cpus.append(c)
        res["cold"] = {"probe kmod": {"first_hit_s": firsts, "exit_s": totals, "host_cpu_s": cpus}}
        log(f"{arch} cold first hit {median(firsts):.2f} s")
    if sections & {"floor", "warm", "load"}:
        with kept(arch) as _vm:
            vm = QemuVM.attach(get_arch(arch))
            assert vm is not None
            try:
                floor_once(vm)  # warm-up
                res["floor_s"] = [floor_once(vm) for _ in range(max(runs, 5))]
            finally:
                vm.detach()
            log(f"{arch} floor {median(res['floor_s']):.3f} s")
            if "warm" in sections:
                res["warm"] = warm_rows(arch, runs, ["kmod", "tracefs"])
                log(f"{arch} warm done")
            if "load" in sections:
                res["load"] = {via: load_run(arch, via, calls) for via in ("kmod", "tracefs")}
                log(f"{arch} load done")
    if "bpf" in sections:
        with kept(arch, "bcc"):
            vm = QemuVM.attach(get_arch(arch))
            assert vm is not None
            try:
                res["bcc_by_hand_s"] = [bcc_by_hand_once(vm)]
            finally:
                vm.detach()
            log(f"{arch} bcc by hand {res['bcc_by_hand_s'][0]:.1f} s")
            res.setdefault("warm", {}).update(warm_rows(arch, runs, ["bpf"]))
            if "load" in sections:
                res.setdefault("load", {})["bpf"] = load_run(arch, "bpf", calls)
        log(f"{arch} bpf done")
    return res


def help_times(runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `kbridge --help`."""
    wall, cpu = [], []
    for _ in range(runs + 1):
        c = child_cpu()
        t = time.perf_counter()
        subprocess.run([*KBRIDGE, "--help"], stdout=subprocess.DEVNULL, check=True)
        wall.append(time.perf_counter() - t)
        cpu.append(child_cpu() - c)
    return wall[1:], cpu[1:]  # the first pays a cold page cache


def show(report: dict) -> None:
    print(f"machine: {report['machine']}")
    print(f"{'arch':7} {'measure':34} {'median s':>9} {'x floor':>8}  runs  host CPU s (the kbridge process)")
    if "help_s" in report:
        print(
            f"{'-':7} {'kbridge --help':34} {median(report['help_s']):9.3f} {'':>8}  {len(report['help_s']):4}  "
            f"{median(report['help_cpu_s']):.3f}"
        )
    for a in report["arches"]:
        floor = median(a.get("floor_s", []))

        def row(
            label: str, xs: list[float], cpu: list[float] | None = None, arch: str = a["arch"], floor: float = floor
        ) -> None:
            ratio = median(xs) / floor if floor == floor else float("nan")
            print(
                f"{arch:7} {label:34} {median(xs):9.3f} {ratio:8.1f}  {len(xs):4}"
                + (f"  {median(cpu):.3f}" if cpu else "")
            )

        if "floor_s" in a:
            row("floor: raw tracefs by hand", a["floor_s"])
        if "bcc_by_hand_s" in a:
            row("bcc by hand: import+compile+attach", a["bcc_by_hand_s"])
        for group in ("warm", "cold"):
            for name, m in a.get(group, {}).items():
                if "first_run_exit_s" in m:
                    row(f"{group} {name}: first run, to exit", m["first_run_exit_s"])
                row(f"{group} {name}: to first hit", m["first_hit_s"])
                row(f"{group} {name}: to exit", m["exit_s"], m.get("host_cpu_s"))
        for via, m in a.get("load", {}).items():
            print(
                f"{a['arch']:7} load 200k {via:8} hits {m['hits']:>7} streamed {m['streamed']:>7} "
                f"lost {m['lost']:>6} missed {m['missed']:>4} {m['events_per_s'] or 0:>8} ev/s  "
                f"({m['wall_s']} s)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    if bad := sections - set(SECTIONS):
        raise SystemExit(f"unknown section(s) {sorted(bad)}: use {','.join(SECTIONS)}")
    # A private state dir: the benchmark never touches the user's kept VMs.
    os.environ.setdefault("KBRIDGE_STATE", tempfile.mkdtemp(prefix="kbb-"))
    os.environ.setdefault("KBRIDGE_ACCEL", "tcg")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    load = os.getloadavg()
    report: dict = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"load {load[0]:.1f}, python {platform.python_version()}",
        "arches": [],
    }
    if "help" in sections:
        report["help_s"], report["help_cpu_s"] = help_times(args.runs)
    for arch in args.arch or ["x86_64", "arm64"]:
        report["arches"].append(bench_arch(arch, args.runs, sections, args.calls, log))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        show(report)


if __name__ == "__main__":
    main()
