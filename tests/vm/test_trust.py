"""Hits that cannot be forged, kills that leak nothing, loads and transfers that end in a known state."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kbridge import modules, targets
from kbridge.api import Guest
from kbridge.arch import ARCHES, get_arch
from kbridge.errors import KbridgeError
from kbridge.mechanisms.kmod.render import module_name
from kbridge.spec import make_spec
from tests.vm import cli
from tests.vm.test_faults import guest_state

DATA = Path(__file__).parent / "data"
LONG = "dd if=/dev/zero of=/dev/null bs=1 count=2000000"  # runs for minutes under TCG
DD3 = "dd if=/dev/zero of=/dev/null bs=7 count=3 status=none"


def test_a_forged_hit_line_is_never_a_hit(kbridge_vm: Guest) -> None:
    """User space can write anything to /dev/kmsg, even a line shaped like the probe module's hits:
    such a record has the user facility, and kbridge reads hits from the kernel's own records only."""
    spec = make_spec("ksys_write", {"pre"}, ["fd=1", "count=3"], kbridge_vm.arch_info, comm="dd")
    resolved = spec.with_symbol(kbridge_vm.spec("ksys_write").symbol)
    mod = module_name(resolved)
    forged = f"{mod}: hit=pre pid=4242 tid=4242 cpu=0 fd=1 count=7 comm=FORGED"
    run = kbridge_vm.probe(
        "ksys_write",
        args={"fd": 1, "count": 3},
        comm="dd",
        run=f"for i in 1 2 3; do echo '{forged}' > /dev/kmsg; done; {DD3}",
    )
    assert [h.comm for h in run.hits] == ["dd", "dd", "dd"]
    summary = run.summary()["mechanisms"]["kmod"]
    assert (summary["hits"], summary["streamed"], summary["lost"]) == (3, 3, 0)
    assert any("3 lines" in n and "written from user space" in n for n in summary.get("notes", [])), summary


@pytest.mark.parametrize("via", ["kmod", "tracefs"])
def test_a_kill_at_any_moment_leaves_nothing_that_counts(kbridge_vm: Guest, via: str) -> None:
    """SIGKILL kbridge at a sweep of moments across arming, the workload's start and the trace_pipe
    reader's: after each, the next command counts exactly and the guest is as it was found."""
    arch = kbridge_vm.arch
    before = guest_state(kbridge_vm)
    args = ["probe", "ksys_write", "--pre", "--comm", "dd", "--run", LONG, "--via", via]
    for delay in [0.15 * k for k in range(1, 11)]:
        proc = cli.start(*args, "--arch", arch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        run = kbridge_vm.probe("ksys_write", args={"fd": 1, "count": 3}, comm="dd", run=DD3, via=via)
        assert [h.args["count"] for h in run.hits] == [7, 7, 7], f"after a kill at {delay:.2f} s: {run.counts}"
        assert run.counts["pre"] == 3, f"after a kill at {delay:.2f} s"
        assert guest_state(kbridge_vm) == before, f"after a kill at {delay:.2f} s"


def test_a_killed_lab_check_leaves_nothing_armed(kbridge_vm: Guest, tmp_path: Path) -> None:
    """A lab check killed while the student's module is loaded: the module is owned like every other,
    so the next command unloads it (its kprobe would log two lines per write for ever)."""
    arch = kbridge_vm.arch
    before = guest_state(kbridge_vm)
    lab = tmp_path / "km"
    solution = cli.run("lab", "solution", "kprobe-module", "--dir", str(lab))
    assert solution.returncode == 0, solution.stderr
    proc = cli.start("lab", "check", str(lab), "--arch", arch, "--json", stdout=subprocess.DEVNULL)
    # The check holds the kept VM while it runs: its own progress says when the module is in.
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "kprobe-module: loads: pass" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert "kprobe-module: loads: pass" in seen[-1], "".join(seen)
    run = kbridge_vm.probe("ksys_write", args={"fd": 1, "count": 3}, comm="dd", run=DD3)
    assert run.counts["pre"] == 3
    assert "kprobe_lab" not in kbridge_vm.loaded_modules()
    assert guest_state(kbridge_vm) == before


def test_a_load_whose_init_does_not_return_ends_in_a_known_state(kbridge_arch: str) -> None:
    """An init that sleeps past the load's timeout cannot be undone: the VM is marked for a restart
    and the error says so; the next use boots a fresh guest."""
    guest = targets.boot(get_arch(kbridge_arch))
    try:
        with pytest.raises(KbridgeError) as e:
            modules.load_module(guest, DATA / "slow_init", timeout=3)
        assert "still running after 3 s" in e.value.message and "marked for a restart" in e.value.message
        assert guest.crashed()
    finally:
        targets.shutdown(guest)


def test_pull_takes_regular_files_only_and_names_a_bad_destination(kbridge_vm: Guest, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(KbridgeError, match="is a character special file in the guest"):
        kbridge_vm.pull("/dev/zero", tmp_path)
    assert time.monotonic() - started < 30  # refused, not read for ever
    with pytest.raises(KbridgeError, match="cannot write '/proc/version'"):
        kbridge_vm.pull("/proc/version", Path("/proc/version"))
    out = kbridge_vm.pull("/proc/version", tmp_path / "version")  # a 0-size /proc file reads whole
    assert out.read_text().startswith("Linux version")


def test_a_push_of_a_program_for_another_arch_is_refused(kbridge_vm: Guest, tmp_path: Path) -> None:
    other = next(a for a in ARCHES if a != kbridge_vm.arch)
    prog = tmp_path / "prog"
    prog.write_bytes(_elf_header(ARCHES[other].elf_machine))
    with pytest.raises(KbridgeError, match=f"is a {other} program and the guest is {kbridge_vm.arch}"):
        kbridge_vm.push(prog, "/tmp/prog")


def _elf_header(machine: int) -> bytes:
    """The first 64 bytes of a little-endian ELF64 executable for MACHINE."""
    head = bytearray(64)
    head[:4] = b"\x7fELF"
    head[4], head[5], head[6] = 2, 1, 1
    head[16:18] = (2).to_bytes(2, "little")  # ET_EXEC
    head[18:20] = machine.to_bytes(2, "little")
    return bytes(head)


def test_a_json_run_cut_short_still_ends_with_a_summary(kbridge_vm: Guest) -> None:
    args = ("probe", "ksys_write", "--pre", "--comm", "dd", "--run", LONG, "--arch", kbridge_vm.arch, "--json")
    proc = cli.start(*args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "handler" in json.loads(first)
    proc.send_signal(signal.SIGINT)
    out, errors = proc.communicate(timeout=60)
    last = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 130, errors
    assert last["summary"]["interrupted"] is True and last["summary"]["signal"] == "SIGINT"
    assert last["summary"]["streamed"] >= 1, (first, out, errors)


def test_a_damaged_module_file_in_the_guest_is_written_again(kbridge_vm: Guest) -> None:
    """The generated module stays in the guest's /tmp by content hash; a file cut short there (a kill
    while it was written, before writes became write-then-rename) is written again, root's alone."""
    assert kbridge_vm.run(["/bin/sh", "-c", "rm -f /tmp/kbridge-*.ko"]).ok  # only this test's module from here
    assert kbridge_vm.probe("ksys_write", comm="dd", run=DD3).counts["pre"] == 3
    cut = "for f in /tmp/kbridge-*.ko; do head -c 100 $f > $f.x && mv $f.x $f; done"
    assert kbridge_vm.run(["/bin/sh", "-c", cut]).ok
    assert kbridge_vm.probe("ksys_write", comm="dd", run=DD3).counts["pre"] == 3
    modes = kbridge_vm.run(["/bin/sh", "-c", "stat -c '%a %s' /tmp/kbridge-*.ko"]).stdout.split("\n")
    assert all(m.startswith("600 ") and int(m.split()[1]) > 100 for m in modes if m), modes
