#!/usr/bin/env python3
"""How fast kbridge is next to the tools people already use, in the same guest kernel, in one run.

For each arch, on one kept VM of the bench image (kbridge/images/bcc.py "bench": the default
image's kernel plus Debian's bpfcc-tools, bpftrace and perf-tools-unstable in a root filesystem):

* floor: raw tracefs by hand through the guest agent: define a kprobe event on ksys_write, enable
  it, run one write, read `trace` back;
* peers, each started fresh in the guest, while a writer (one `dd bs=7 count=1` every 20 ms) runs:
  perf-tools' `kprobe-perf 'p:ksys_write' 'comm == "dd"'` and `bpftrace -e 'kprobe:ksys_write
  /comm == "dd"/ { printf(...) }'` to their first hit line, bcc's `funccount-bpfcc ksys_write` to
  its "Tracing" line (it prints no hits, only counts at the end);
* kbridge warm (the VM kept): `kbridge probe` (kmod, --via tracefs, --via bpf) and `kbridge trace`
  as a user runs them, to the first hit on stdout and to exit, with the CPU time of the kbridge
  process; --via bpf's first run in the VM (a program it never loaded) apart from the repeats;
* kbridge cold: `kbridge probe` with no VM running (the default image, cached) to the first hit;
* `kbridge --help`;
* load: `dd bs=1 count=200000` (--comm dd) through each kbridge mechanism (exact hits, streamed,
  lost, events/s) and each peer (what it counted or streamed).

Every time is printed with its ratio to the best peer of that arch in that run (the machines here
are shared and noisy: read the ratios), and each goal of the speed work is checked.

    python bench/bench_speed.py [--arch x86_64 --arch arm64] [--runs 3] [--calls 200000]
                                [--only help,floor,peers,warm,cold,load] [--json]
"""

from __future__ import annotations

import argparse
import compileall
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

SECTIONS = ("help", "floor", "peers", "warm", "cold", "load")
FLOOR_EVENT = "kbfloor/w"
ONE_WRITE = "dd if=/dev/zero of=/dev/null bs=7 count=1 2>/dev/null"
WRITER = "while :; do dd if=/dev/zero of=/dev/null bs=7 count=1 2>/dev/null; usleep 20000; done"
KBRIDGE = [str(Path(sys.executable).with_name("kbridge"))]
PORT = "org.kbridge.trace"
ROOTFS = "/rootfs"
# The peers as Debian ships them (in the bench image's root filesystem, run with chroot).
PEERS: dict[str, dict] = {
    "perf-tools kprobe": {
        "argv": ["/usr/sbin/kprobe-perf", "p:ksys_write", 'comm == "dd"'],
        "ready": "Tracing kprobe",
        "hit": "ksys_write: (",  # each event as trace_pipe prints it
        "streams": True,
    },
    "bpftrace": {
        "argv": [
            "/usr/bin/bpftrace",
            *("-B", "none"),  # as at a terminal: each line when printed (a pipe is fully buffered)
            "-e",
            'kprobe:ksys_write /comm == "dd"/ { @n = count(); printf("hit %d\\n", pid); }',
        ],
        "ready": "Attaching",
        "hit": "hit ",
        "streams": True,
        "count": "@n: ",
    },
    "bcc funccount": {
        "argv": ["/usr/sbin/funccount-bpfcc", "ksys_write"],
        "ready": "Tracing 1 functions",
        "hit": None,  # counts only: its "Tracing" line (printed once attached) stands for its first hit
        "streams": False,
        "count": "ksys_write ",
    },
}


class PeerFailed(Exception):
    """A peer that did not get to its first hit: its row says so, the run goes on."""


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def child_cpu() -> float:
    """CPU seconds (user + system) of the child processes waited for so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_cli(argv: list[str], timeout: float = 600.0) -> tuple[float, float, float]:
    """(seconds to the first hit line on stdout, seconds to exit, CPU seconds of the kbridge process)."""
    cpu0 = child_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen([*KBRIDGE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = float("nan")
    for raw in proc.stdout:
        if raw.startswith("{") and '"summary"' not in raw:
            first = time.perf_counter() - start
            break
    _rest, errs = proc.communicate(timeout=timeout)
    total = time.perf_counter() - start
    if proc.returncode != 0 or first != first:
        raise SystemExit(f"kbridge {' '.join(argv)} failed ({proc.returncode}): {errs.strip()[-800:]}")
    return first, total, child_cpu() - cpu0


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


@contextlib.contextmanager
def attached(arch_name: str) -> Iterator[Target]:
    """The kept VM, attached (locked) for the block."""
    from kbridge.arch import get_arch
    from kbridge.targets.qemu import QemuVM

    vm = QemuVM.attach(get_arch(arch_name))
    assert vm is not None
    try:
        yield vm
    finally:
        vm.detach()


@contextlib.contextmanager
def kept(arch_name: str, flavour: str = "bench") -> Iterator[None]:
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
        yield
    finally:
        if (vm2 := QemuVM.attach(arch)) is not None:
            vm2.shutdown()


def stop_guest(vm: Target, proc: object, sig: str = "-INT") -> None:
    """Signal an owned guest process (and its session), then wait for it to end."""
    from kbridge.targets.ownership import OwnedProcess

    assert isinstance(proc, OwnedProcess)
    vm.run(["/bin/busybox", "kill", sig, f"-{proc.pid}"], timeout=30)
    with contextlib.suppress(Exception):
        proc.wait(timeout=60)
    proc.stop()


def peer_argv(vm: Target, name: str) -> list[str]:
    """Peer NAME run in the bench image's root filesystem, its output (stdout and stderr) on the trace port."""
    # As at a terminal: bcc's Python tools print each line when it is printed, not at exit.
    run = 'p=$1; shift; export PYTHONUNBUFFERED=1; exec chroot "$@" > "$p" 2>&1'
    return ["/bin/sh", "-c", run, "kbridge-peer", vm.stream_path(PORT), ROOTFS, *PEERS[name]["argv"]]


def peer_once(vm: Target, name: str) -> dict:
    """Start peer NAME in the guest while the writer runs: seconds to its ready line and to its first hit."""
    from kbridge.targets import ownership

    peer = PEERS[name]
    stream = vm.stream(PORT, idle=0.02)
    next(stream)
    writer = ownership.spawn(vm, ["/bin/sh", "-c", WRITER])
    start = time.perf_counter()
    proc = ownership.spawn(vm, peer_argv(vm, name))
    ready = hit = float("nan")
    lines: list[str] = []
    try:
        deadline = start + 300
        while time.perf_counter() < deadline:
            line = next(stream)
            if line is None:
                if proc.poll() is not None:
                    raise PeerFailed(f"{name} exited: {lines[-10:]}")
                continue
            lines.append(line)
            now = time.perf_counter() - start
            if ready != ready and peer["ready"] in line:
                ready = now
                if peer["hit"] is None:
                    hit = now
                    break
            if peer["hit"] is not None and peer["hit"] in line:
                hit = now
                break
        else:
            raise PeerFailed(f"{name}: no hit within 300 s: {lines[-10:]}")
    finally:
        stop_guest(vm, proc)
        stop_guest(vm, writer, "-KILL")
        vm.close_stream(PORT)
    return {"ready_s": ready, "first_hit_s": hit}


def peer_load(vm: Target, name: str, calls: int) -> dict:
    """`dd bs=1 count=CALLS` under peer NAME: what it streamed (hit lines) and what it counted."""
    from kbridge.targets import ownership

    peer = PEERS[name]
    stream = vm.stream(PORT, idle=0.05)
    next(stream)
    proc = ownership.spawn(vm, peer_argv(vm, name))
    lines: list[str] = []
    ready = False
    hits = 0
    deadline = time.perf_counter() + 300
    while not ready:
        if time.perf_counter() > deadline:
            proc.stop()
            vm.close_stream(PORT)
            raise PeerFailed(f"{name}: not ready within 300 s: {lines[-10:]}")
        line = next(stream)
        if line is not None:
            lines.append(line)
            ready = peer["ready"] in line
    time.sleep(1.0)  # kprobe-perf and bpftrace print "ready" before they attach
    start = time.perf_counter()
    dd = ownership.spawn(vm, ["/bin/sh", "-c", f"dd if=/dev/zero of=/dev/null bs=1 count={calls} 2>/dev/null"])
    while dd.poll() is None:
        line = next(stream)
        if line is not None and peer["hit"] and peer["hit"] in line:
            hits += 1
    wall = time.perf_counter() - start
    vm.run(["/bin/busybox", "kill", "-INT", f"-{proc.pid}"], timeout=30)
    counted = None
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        line = next(stream)
        if line is None:
            if proc.poll() is not None:
                break
            continue
        if peer["hit"] and peer["hit"] in line:
            hits += 1
        if peer.get("count") and line.strip().startswith(peer["count"].strip()):
            counted = int(line.split()[-1])
    proc.stop()
    vm.close_stream(PORT)
    expected = calls + 1  # dd's own summary write to fd 2 as well
    out: dict = {"expected": expected, "wall_s": round(wall, 2)}
    if peer["streams"]:
        out["streamed"] = hits
        out["lost"] = expected - hits
    if counted is not None:
        out["counted"] = counted
    return out


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
    }


def probe_argv(arch: str, via: str, comm: str = "dd") -> list[str]:
    return ["probe", "ksys_write", "--pre", "--via", via, "--arch", arch, "--json", "--comm", comm, "--run", ONE_WRITE]


def warm_rows(arch: str, runs: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    # --via bpf's first run in this VM: a program the guest never loaded (the loader and the object come
    # with the initramfs; nothing is compiled per probe, on the host or in the guest).
    f, t, c = timed_cli(probe_argv(arch, "bpf"))
    out["probe bpf, new program"] = {"first_hit_s": [f], "exit_s": [t], "host_cpu_s": [c]}
    cmds: dict[str, list[str]] = {
        "probe kmod": probe_argv(arch, "kmod"),
        "probe --via tracefs": probe_argv(arch, "tracefs"),
        "trace": ["trace", "--arch", arch, "--json", "--comm", "dd", "--run", ONE_WRITE, "p:kbbench/w ksys_write"],
        "probe bpf, repeated": probe_argv(arch, "bpf"),
    }
    for name, argv in cmds.items():
        timed_cli(argv)  # the first run builds the module (unless cached) and warms the guest's paths
        firsts, totals, cpus = [], [], []
        for _ in range(runs):
            f, t, c = timed_cli(argv)
            firsts.append(f)
            totals.append(t)
            cpus.append(c)
        out[name] = {"first_hit_s": firsts, "exit_s": totals, "host_cpu_s": cpus}
    return out


def bench_arch(arch: str, runs: int, sections: set[str], calls: int, log: Callable[[str], None]) -> dict:
    from kbridge.arch import get_arch
    from kbridge.targets.qemu import QemuVM

    res: dict = {"arch": arch}
    if "cold" in sections:
        if (old := QemuVM.attach(get_arch(arch))) is not None:
            old.shutdown()
        argv = probe_argv(arch, "kmod")
        timed_cli(argv)  # builds/caches the module and, where supported, the saved guest state
        firsts, totals, cpus = [], [], []
        for _ in range(runs):
            f, t, c = timed_cli(argv)
            firsts.append(f)
            totals.append(t)
            cpus.append(c)
        res["cold"] = {"probe kmod": {"first_hit_s": firsts, "exit_s": totals, "host_cpu_s": cpus}}
        log(f"{arch} cold first hit {median(firsts):.2f} s")
    if not sections & {"floor", "peers", "warm", "load"}:
        return res
    with kept(arch, "bench"):
        if "floor" in sections:
            with attached(arch) as vm:
                floor_once(vm)  # warm-up
                res["floor_s"] = [floor_once(vm) for _ in range(max(runs, 5))]
            log(f"{arch} floor {median(res['floor_s']):.3f} s")
        if "warm" in sections:
            res["warm"] = warm_rows(arch, runs)
            for name, m in res["warm"].items():
                log(f"{arch} warm {name}: first hit {median(m['first_hit_s']):.3f} s, exit {median(m['exit_s']):.3f} s")
        if "peers" in sections:
            res["peers"] = {}
            with attached(arch) as vm:
                for name in PEERS:
                    try:
                        found = [peer_once(vm, name) for _ in range(runs)]
                    except PeerFailed as e:
                        res.setdefault("peers_failed", {})[name] = str(e)
                        log(f"{arch} {e}")
                        continue
                    res["peers"][name] = {k: [f[k] for f in found] for k in ("ready_s", "first_hit_s")}
                    log(f"{arch} {name}: first hit {median(res['peers'][name]['first_hit_s']):.2f} s")
        if "load" in sections:
            res["load"] = {via: load_run(arch, via, calls) for via in ("kmod", "tracefs", "bpf")}
            log(f"{arch} load (kbridge) done")
            if "peers" in sections:
                with attached(arch) as vm:
                    res["peer_load"] = {}
                    for name in set(PEERS) - set(res.get("peers_failed", {})):
                        try:
                            res["peer_load"][name] = peer_load(vm, name, calls)
                        except PeerFailed as e:
                            log(f"{arch} {e}")
                log(f"{arch} load (peers) done")
    return res


def help_times(runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `kbridge --help`."""
    wall, cpu = [], []
    for _ in range(max(runs, 5) + 1):
        c = child_cpu()
        t = time.perf_counter()
        subprocess.run([*KBRIDGE, "--help"], stdout=subprocess.DEVNULL, check=True)
        wall.append(time.perf_counter() - t)
        cpu.append(child_cpu() - c)
    return wall[1:], cpu[1:]  # the first pays a cold page cache


def best_peer(a: dict) -> tuple[str, float] | None:
    peers = {name: median(p["first_hit_s"]) for name, p in a.get("peers", {}).items()}
    return min(peers.items(), key=lambda kv: kv[1]) if peers else None


def goals(report: dict) -> list[str]:
    """Each goal of the speed work, met or missed by how much, from this run's figures."""
    out: list[str] = []

    def verdict(what: str, value: float, limit: float, unit: str = "s") -> None:
        if value != value:
            return
        ok = value <= limit
        by = "" if ok else f", missed by {value - limit:.3f} {unit} ({value / limit:.1f}x)"
        out.append(f"{'met' if ok else 'MISSED'}: {what}: {value:.3f} {unit} <= {limit:.3f} {unit}{by}")

    if "help_s" in report:
        verdict("kbridge --help", median(report["help_s"]), 0.08)
    bpf_new: dict[str, float] = {}
    for a in report["arches"]:
        arch = a["arch"]
        peers = {name: median(p["first_hit_s"]) for name, p in a.get("peers", {}).items()}
        warm = a.get("warm", {})
        if "bpftrace" in peers and "probe bpf, new program" in warm:
            bpf_new[arch] = median(warm["probe bpf, new program"]["first_hit_s"])
            verdict(f"{arch} new eBPF program, first hit <= bpftrace's", bpf_new[arch], peers["bpftrace"])
        if "probe bpf, repeated" in warm:
            verdict(f"{arch} repeated eBPF program, first hit", median(warm["probe bpf, repeated"]["first_hit_s"]), 0.3)
        if "perf-tools kprobe" in peers:
            for name in ("probe kmod", "probe --via tracefs", "trace"):
                if name in warm:
                    verdict(
                        f"{arch} warm {name}, first hit <= perf-tools kprobe's",
                        median(warm[name]["first_hit_s"]),
                        peers["perf-tools kprobe"],
                    )
        for name in ("probe kmod", "probe --via tracefs", "trace"):
            if name in warm:
                verdict(f"{arch} warm {name}, one-write command to exit", median(warm[name]["exit_s"]), 0.4)
                verdict(f"{arch} warm {name}, host CPU", median(warm[name]["host_cpu_s"]), 0.1)
        if "cold" in a:
            verdict(f"{arch} cold probe, first hit", median(a["cold"]["probe kmod"]["first_hit_s"]), 0.6)
        for via, m in a.get("load", {}).items():
            lost = m["lost"]
            out.append(f"{'met' if lost == 0 else 'MISSED'}: {arch} 200k writes through {via}: {lost} lost")
    if "x86_64" in bpf_new and "arm64" in bpf_new:
        verdict("arm64 new eBPF program within 1.5x of x86_64's", bpf_new["arm64"], 1.5 * bpf_new["x86_64"])
    return out


def row(
    label: str, base: float, first: list[float], total: list[float] | None = None, cpu: list[float] | None = None
) -> None:
    """One line of the table: medians, and each time as a ratio to BASE (the best peer's first hit)."""
    f = median(first)
    t = median(total) if total else float("nan")
    print(
        f"{label:44} {f:11.3f} {f / base:7.2f} "
        + (f"{t:7.3f} {t / base:7.2f} " if total else f"{'':7} {'':7} ")
        + (f"{median(cpu):6.3f}" if cpu else f"{'':6}")
        + f"  {len(first)}"
    )


def show(report: dict) -> None:
    print(f"machine: {report['machine']}")
    if "help_s" in report:
        print(f"kbridge --help: {median(report['help_s']):.3f} s (CPU {median(report['help_cpu_s']):.3f} s)")
    for a in report["arches"]:
        arch = a["arch"]
        best = best_peer(a)
        base = best[1] if best else float("nan")
        print(f"\n{arch}: best peer {best[0] + f' {best[1]:.3f} s' if best else '(not run)'}")
        print(f"{'':44} {'first hit s':>11} {'x best':>7} {'exit s':>7} {'x best':>7} {'CPU s':>6}  runs")

        if "floor_s" in a:
            row("floor: raw tracefs by hand (to trace read)", base, a["floor_s"])
        for name, p in a.get("peers", {}).items():
            label = f"peer: {name}" + (" (ready: counts only)" if PEERS[name]["hit"] is None else "")
            row(label, base, p["first_hit_s"])
        for name, why in a.get("peers_failed", {}).items():
            print(f"peer: {name}: FAILED ({why})")
        for name, m in a.get("warm", {}).items():
            row(f"kbridge warm {name}", base, m["first_hit_s"], m["exit_s"], m["host_cpu_s"])
        for name, m in a.get("cold", {}).items():
            row(f"kbridge cold {name} (no VM running)", base, m["first_hit_s"], m["exit_s"], m["host_cpu_s"])
        for via, m in a.get("load", {}).items():
            print(
                f"200k writes, kbridge {via:8}: hits {m['hits']:>7} streamed {m['streamed']:>7} lost {m['lost']:>6} "
                f"missed {m['missed']:>3} {m['events_per_s'] or 0:>7} ev/s ({m['wall_s']} s)"
            )
        for name, m in a.get("peer_load", {}).items():
            what = [f"{k} {v}" for k, v in m.items() if k != "wall_s"]
            print(f"200k writes, {name:18}: {', '.join(what)} ({m['wall_s']} s)")
    print("\ngoals:")
    for line in goals(report):
        print(f"  {line}")


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
    # As installed: `pip install` compiles every module once. Where PYTHONDONTWRITEBYTECODE is set (or
    # the checkout was never run), each command would compile its imports again: ~0.1 s of CPU per
    # warm probe that no installed kbridge spends.
    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "kbridge"), quiet=1)

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
    report["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        show(report)


if __name__ == "__main__":
    main()
