"""`kbridge probe` on real guest kernels: hits, arguments, return values, exact counters, cleanup."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from kbridge.errors import KbridgeError
from kbridge.mechanisms.engine import StopRule
from kbridge.probe import probe
from kbridge.spec import make_spec
from kbridge.symbols import SymbolError
from kbridge.workload import Workload
from tests.vm import cli

# Exactly 3 write() calls of 7 bytes to fd 1 (/dev/null), then dd's own report to fd 2.
DD = Workload(("/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=7", "count=3"), "dd bs=7 count=3")


def _guest_state(vm):
    return vm.loaded_modules(), vm.kprobes_list()


def test_kprobe_and_kretprobe_see_each_write(kbridge_vm):
    spec = make_spec("ksys_write", {"pre", "ret"}, ["fd=1", "count=3"], kbridge_vm.arch_info, comm="dd")
    run = probe(spec, kbridge_vm.arch_info, DD)
    r = run.results[0]
    pre = [h for h in r.hits if h.handler == "pre" and h.args["fd"] == 1]
    ret = [h for h in r.hits if h.handler == "ret" and h.args["fd"] == 1]
    assert [h.args["count"] for h in pre] == [7, 7, 7]
    assert [h.retval for h in ret] == [7, 7, 7]
    assert {h.comm for h in r.hits} == {"dd"} and len({h.pid for h in r.hits}) == 1
    # The exact counters agree with every streamed hit (dd's report to fd 2 included).
    assert r.counters["pre"] == r.counters["ret"] == len(r.hits) // 2 >= 3
    assert r.lost == 0 and r.missed == 0 and r.workload_exit == 0
    mods, kprobes = _guest_state(kbridge_vm)
    assert not any(m.startswith("kb_") for m in mods)
    assert "ksys_write" not in kprobes


def test_syscall_alias_reads_the_syscall_arguments(kbridge_vm):
    spec = make_spec("sys_write", {"pre"}, ["fd=1", "count=3"], kbridge_vm.arch_info, comm="dd")
    run = probe(spec, kbridge_vm.arch_info, DD)
    assert run.resolution.symbol == kbridge_vm.arch_info.syscall_entry("write")  # sys_write itself on arm
    hits = run.results[0].hits
    assert sorted((h.args["fd"], h.args["count"]) for h in hits)[:3] == [(1, 7), (1, 7), (1, 7)]
    assert run.results[0].counters == {"pre": len(hits)}


def test_count_stops_early_but_counters_stay_exact(kbridge_vm):
    spec = make_spec("vfs_read", {"entry", "ret"}, [], kbridge_vm.arch_info, comm="dd")
    workload = Workload(("/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=50"), "dd bs=1 count=50")
    r = probe(spec, kbridge_vm.arch_info, workload, StopRule(count=4)).results[0]
    assert len(r.hits) == 4
    assert r.counters["entry"] == r.counters["ret"] >= 4


def test_unknown_symbol_fails_before_loading(kbridge_vm):
    with pytest.raises(SymbolError, match="unknown symbol 'ksys_wrte'") as e:
        probe(make_spec("ksys_wrte", {"pre"}), kbridge_vm.arch_info, DD)
    assert "ksys_write" in e.value.hint
    assert not any(m.startswith("kb_") for m in _guest_state(kbridge_vm)[0])


def test_blacklisted_symbol_is_refused(kbridge_vm):
    with kbridge_vm.session() as s:
        name = next(n for n in sorted(s.blacklist) if s.symbols.text(n) and len(s.symbols.text(n)) == 1)
    with pytest.raises(SymbolError, match="kprobe blacklist"):
        probe(make_spec(name, {"pre"}), kbridge_vm.arch_info, DD)


def test_register_error_is_translated_and_nothing_stays_loaded(kbridge_vm):
    # Offset 1 is inside the first instruction on both arches (arm64: not 4-byte aligned).
    spec = make_spec("vfs_read", {"pre"}, [], kbridge_vm.arch_info, offset=1)
    with pytest.raises(KbridgeError, match=r"register_kprobe on 'vfs_read\+0x1' failed with -(EILSEQ|EINVAL)"):
        probe(spec, kbridge_vm.arch_info, DD)
    mods, kprobes = _guest_state(kbridge_vm)
    assert not any(m.startswith("kb_") for m in mods) and "vfs_read" not in kprobes


def test_cli_json_lines(kbridge_vm):
    proc = cli.run(
        "probe",
        "ksys_write",
        "--pre",
        "--arg",
        "fd=1",
        "--arg",
        "count=3",
        "--comm",
        "sh",
        "--run",
        "echo hello > /tmp/x",
        "--arch",
        kbridge_vm.arch,
        "--json",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    *hits, last = lines
    summary = last["summary"]
    assert summary["symbol"] == "ksys_write" and summary["arch"] == kbridge_vm.arch
    assert summary["kernel"] == kbridge_vm.krel and summary["accel"] in ("kvm", "tcg")
    assert summary["mechanisms"]["kmod"]["hits"] == len(hits) >= 1
    assert summary["mechanisms"]["kmod"]["missed"] == 0
    hello = [h for h in hits if h["args"]["count"] == len("hello\n")]
    assert hello and all(h["mechanism"] == "kmod" and h["handler"] == "pre" and h["comm"] == "sh" for h in hello)
    assert {"pid", "cpu", "args", "symbol"} <= set(hello[0])


# Reads for ever: the probe fires until it is stopped.
READ_LOOP = (
    "probe",
    "vfs_read",
    "--pre",
    "--duration",
    "120",
    "--run",
    "while true; do dd if=/proc/version of=/dev/null 2>/dev/null; done",
)


@pytest.fixture
def short_dir():
    """A state dir short enough for unix socket paths (pytest's tmp_path can be too long)."""
    d = tempfile.mkdtemp(prefix="kb-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_ctrl_c_leaves_nothing_behind(short_dir, kbridge_arch):
    """An ephemeral VM (own state dir): SIGINT mid-probe unloads, stops QEMU, exits 130."""
    env = {**os.environ, "KBRIDGE_STATE": short_dir}
    proc = cli.start(*READ_LOOP, "--arch", kbridge_arch, "--json", env=env)
    first = proc.stdout.readline()  # the first hit: the probe is armed and firing
    assert json.loads(first)["handler"] == "pre"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if short_dir in " ".join(p.info["cmdline"] or [])]


def test_ctrl_c_at_a_terminal_signals_the_whole_group(short_dir, kbridge_arch):
    """A terminal sends SIGINT to the whole foreground process group: QEMU must not die first and
    be reported as a crash; kbridge says it was interrupted, exits 130 and leaves nothing."""
    env = {**os.environ, "KBRIDGE_STATE": short_dir}
    proc = cli.start(*READ_LOOP, "--arch", kbridge_arch, "--json", env=env, start_new_session=True)
    first = proc.stdout.readline()
    assert json.loads(first)["handler"] == "pre"
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: every process of the group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "QEMU exited" not in stderr
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if short_dir in " ".join(p.info["cmdline"] or [])]


def test_vm_down_all_leaves_a_running_probe_alone(short_dir, kbridge_arch):
    """An ephemeral VM whose kbridge still runs is not a stray: vm status and vm down --all spare it."""
    env = {**os.environ, "KBRIDGE_STATE": short_dir}
    run = "sleep 3; dd if=/dev/zero of=/dev/null bs=7 count=3"
    proc = cli.start(
        "probe", "ksys_write", "--pre", "--comm", "dd", "--arch", kbridge_arch, "--run", run, "--json", env=env
    )
    deadline = time.monotonic() + 120
    while not [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if (p.info["name"] or "").startswith("qemu") and short_dir in " ".join(p.info["cmdline"] or [])
    ]:
        assert time.monotonic() < deadline and proc.poll() is None, "no QEMU started"
        time.sleep(0.1)
    status = cli.run("vm", "status", "--json", env=env, timeout=60)
    assert json.loads(status.stdout)["stray_qemu_pids"] == []
    down = cli.run("vm", "down", "--all", env=env, timeout=60)
    assert down.returncode == 0, down.stderr
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    hits = [json.loads(line) for line in out.splitlines() if '"handler"' in line]
    assert sum(1 for h in hits if h["args"] == {}) >= 3
    assert not os.listdir(short_dir) or all(not d.startswith("run-") for d in os.listdir(short_dir))


def test_guest_panic_is_detected(short_dir, kbridge_arch):
    env = {**os.environ, "KBRIDGE_STATE": short_dir}
    code = (
        "from kbridge import targets; from kbridge.arch import get_arch\n"
        "from kbridge.targets.base import GuestCrash\n"
        f"vm = targets.boot(get_arch('{kbridge_arch}'))\n"
        "try:\n"
        "    vm.spawn(['/bin/sh', '-c', 'echo c > /proc/sysrq-trigger'])\n"  # may already see the panic
        "    vm.proc.wait(timeout=120)\n"  # panic=-1 + -no-reboot: QEMU exits
        "    vm.run(['/bin/true'], timeout=10)\n"
        "except GuestCrash as e:\n"
        "    print('CRASH', 'sysrq' in e.text.lower() or 'Kernel panic' in e.text)\n"
        "vm.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert "CRASH True" in out.stdout, out.stderr[-2000:]
