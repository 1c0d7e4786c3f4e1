"""Faults on a kept VM: a kbridge killed with SIGKILL mid-run leaves nothing that the next command
counts wrong or trips over; the next command reclaims it and the guest ends exactly as it was found."""

from __future__ import annotations

import json
import signal

import pytest

import kbridge
from kbridge.api import Guest
from tests.vm import cli

LOOP = "while true; do echo x > /dev/null; done"  # sh writes for ever: ksys_write fires until killed
DD = "dd if=/dev/zero of=/dev/null bs=7 count=3"


def guest_state(vm: Guest) -> dict:
    """What a run may leave behind: modules, kprobes, kprobe_events, user processes."""
    procs = vm.run(
        [
            "/bin/sh",
            "-c",
            'for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = "$$" ] && continue; '
            '[ -s "$d/cmdline" ] && echo "$p $(cat "$d/comm")"; done; true',
        ]
    ).text
    return {
        "modules": sorted(vm.loaded_modules()),
        "kprobes": vm.kprobes_list(),
        "kprobe_events": vm.read_file("/sys/kernel/tracing/kprobe_events").decode(),
        "processes": sorted(procs.splitlines()),
    }


def kill_when(args: list[str], ready: str, arch: str) -> str:
    """Start `kbridge ARGS`, SIGKILL it once READY ("hit": its first JSON hit; "insmod": a kb_ module
    is loaded), and return what it printed on stderr."""
    proc = cli.start(*args, "--arch", arch, "--json")
    try:
        assert proc.stdout is not None
        if ready == "hit":
            line = proc.stdout.readline()
            assert line and "handler" in json.loads(line), proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return err


@pytest.mark.parametrize(
    "args",
    [
        ["probe", "ksys_write", "--pre", "--comm", "sh", "--run", LOOP],
        ["probe", "ksys_write", "--pre", "--comm", "sh", "--run", LOOP, "--via", "tracefs"],
        ["trace", "p:faults/w ksys_write", "--comm", "sh", "--run", LOOP],
    ],
    ids=["kmod", "tracefs", "trace"],
)
def test_sigkill_mid_run_is_reclaimed(kbridge_vm: Guest, args: list[str]) -> None:
    before = guest_state(kbridge_vm)
    kill_when(args, "hit", kbridge_vm.arch)
    # The next command on the same VM works and counts exactly: the leftover reader and workload
    # are gone before it arms anything.
    run = kbridge_vm.probe("ksys_write", args={"fd": 1, "count": 3}, comm="dd", run=DD)
    assert sorted(h.args["count"] for h in run.hits if h.args["fd"] == 1) == [7, 7, 7]
    if args[0] == "trace":
        again = kbridge_vm.trace("p:faults/w2 ksys_write", comm="dd", run=DD)
        assert again.counters["faults/w2"] == len(again.hits) == run.counts["pre"]
    assert guest_state(kbridge_vm) == before


def test_sigkill_before_the_workload_ends(kbridge_vm: Guest) -> None:
    # The first hit is dd's read before `sleep 30`: the module is loaded and armed, the
    # workload still running, when kbridge dies.
    before = guest_state(kbridge_vm)
    kill_when(
        ["probe", "vfs_read", "--pre", "--run", "dd if=/dev/zero of=/dev/null count=1; sleep 30"],
        "hit",
        kbridge_vm.arch,
    )
    # The same spec builds the same module name: before reclaim this failed with
    # "insmod ... File exists".
    run = kbridge_vm.probe("vfs_read", run=DD)
    assert run.counts["pre"] >= 3
    assert guest_state(kbridge_vm) == before


def test_bpf_loader_of_a_killed_kbridge_is_stopped(kbridge_vm: Guest, kbridge_arch: str) -> None:
    with kbridge.vm(arch=kbridge_arch) as vm:  # the kept VM
        before = guest_state(vm)
        kill_when(["probe", "ksys_write", "--pre", "--comm", "sh", "--run", LOOP, "--via", "bpf"], "hit", kbridge_arch)
        run = vm.probe("ksys_write", args={"fd": 1, "count": 3}, comm="dd", run=DD, via="bpf")
        assert sorted(h.args["count"] for h in run.hits if h.args["fd"] == 1) == [7, 7, 7]
        assert guest_state(vm) == before


def test_sigterm_unwinds_like_ctrl_c(kbridge_vm: Guest) -> None:
    """SIGTERM (kill, a CI timeout) runs every cleanup: nothing is left for the next command to reclaim."""
    from kbridge.targets import ownership
    from kbridge.targets.qemu import QemuVM

    before = guest_state(kbridge_vm)
    proc = cli.start("probe", "ksys_write", "--pre", "--comm", "sh", "--run", LOOP, "--arch", kbridge_vm.arch, "--json")
    assert proc.stdout is not None and "handler" in json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err, err[-2000:]
    vm = QemuVM.attach(kbridge_vm.arch_info, kbridge_vm.suite)  # attach without reclaiming anything
    assert vm is not None
    try:
        assert ownership.records(vm) == []
    finally:
        vm.detach()
    assert guest_state(kbridge_vm) == before
