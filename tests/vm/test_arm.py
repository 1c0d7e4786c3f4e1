"""32-bit arm (Debian armhf, the armmp 6.1 kernel) in every default run: a few fast tests on one arm VM.

The rest of the suite runs on arm with `--kbridge-arch arm`; these are the facts that differ on
arm, checked in every run: arguments from r0-r3 (no regs_get_kernel_argument(), no $argN), the
return value from r0, no syscall wrapper, the undefined-instruction breakpoint with the probed
instruction simulated or emulated instead of single-stepped, the optimized `b`, a user's module
cross-built for armhf, and the breakpoint lab.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kbridge.api import Guest
from kbridge.inspect import OPTIMIZATION, inspect
from kbridge.labs import get, labdir
from kbridge.labs.checkers.breakpoint import mnemonic
from kbridge.labs.grading import Status
from kbridge.labs.runner import check_dirs
from kbridge.session import Session

pytestmark = [pytest.mark.vm, pytest.mark.kbridge_arches("arm")]

EXAMPLE = Path(__file__).parents[2] / "examples" / "chardev"
# Exactly 3 write() calls of 7 bytes to fd 1 (/dev/null), then dd's report to fd 2.
DD = "dd if=/dev/zero of=/dev/null bs=7 count=3"
UDF = "f801f0e7"  # 0xe7f001f8, KPROBE_ARM_BREAKPOINT_INSTRUCTION with the condition "always", little endian


def test_kprobe_arguments_from_r0_r3_and_no_single_step(kbridge_vm: Guest) -> None:
    run = kbridge_vm.probe("ksys_write", pre=True, post=True, args={"fd": 1, "count": 3}, comm="dd", run=DD)
    pre = [h for h in run.hits if h.handler == "pre" and h.args["fd"] == 1]
    post = [h for h in run.hits if h.handler == "post" and h.args["fd"] == 1]
    assert [h.args["count"] for h in pre] == [h.args["count"] for h in post] == [7, 7, 7]
    assert run.counts["pre"] == run.counts["post"] == len(run.hits) // 2 >= 3
    assert run.result.lost == 0 and run.result.missed == 0
    for h in run.hits:
        # A post-handler forbids jump optimization: the undefined instruction traps, pc stays at the
        # probe for the pre-handler; the push at ksys_write+0 is emulated, and pc moves past it.
        assert h.mode == "breakpoint" and h.arch == "arm"
        assert h.ip == (h.addr if h.handler == "pre" else h.addr + 4)  # type: ignore[operator]
        assert h.flags is not None and h.flags & 0x1F == 0x13  # cpsr: SVC mode
        assert set(h.to_json()) >= {"pc", "cpsr", "addr"}
    how = [n for n in run.result.notes if "when the breakpoint fires" in n]
    assert how and "emulated by emulate_" in how[0] and "instruction slot" in how[0], run.result.notes


def test_kretprobe_and_the_syscall_without_a_wrapper(kbridge_vm: Guest) -> None:
    run = kbridge_vm.probe("ksys_write", ret=True, args={"fd": 1, "count": 3}, comm="dd", run=DD)
    rets = [(h.args["count"], h.retval) for h in run.hits if h.handler == "ret" and h.args["fd"] == 1]
    assert rets == [(7, 7), (7, 7), (7, 7)]
    assert run.counts["ret"] == len(run.hits) >= 3 and run.result.lost == 0
    # No CONFIG_ARCH_HAS_SYSCALL_WRAPPER: sys_write is the syscall itself, its arguments in r0-r2.
    sys = kbridge_vm.probe("sys_write", pre=True, args={"fd": 1, "count": 3}, comm="dd", run=DD)
    assert sys.resolution.symbol == "sys_write"
    assert sorted((h.args["fd"], h.args["count"]) for h in sys.hits)[:3] == [(1, 7), (1, 7), (1, 7)]


def test_trace_the_classic_line_and_arguments_by_register(kbridge_vm: Guest) -> None:
    classic = kbridge_vm.trace("p:sys_write_event sys_write", run=DD, comm="dd")
    assert classic.counters["kprobes/sys_write_event"] == len(classic.hits) >= 3
    assert classic.lost == 0 and all("sys_write_event:" in h.raw for h in classic.hits)  # type: ignore[attr-defined]
    # $argN does not exist here: the arguments are %r0..%r3 at the entry.
    regs = kbridge_vm.trace("p:kbt/w ksys_write fd=%r0:u64 count=%r2:u64", run=DD, comm="dd")
    assert [h.args["count"] for h in regs.hits if h.args["fd"] == 1] == [7, 7, 7]
    via = kbridge_vm.probe("ksys_write", pre=True, args={"fd": 1, "count": 3}, comm="dd", run=DD, via="tracefs")
    assert [h.args["count"] for h in via.hits if h.args["fd"] == 1] == [7, 7, 7]


def test_inspect_shows_the_undefined_instruction_and_the_original_restored(kbridge_session: Session) -> None:
    ins = inspect(kbridge_session, "ksys_write", force_breakpoint=True)
    assert ins.mode == "breakpoint" and "[OPTIMIZED]" not in ins.list_lines["armed"]
    assert ins.insn["armed"][:8] == ins.breakpoint_word == UDF
    assert ins.insn["before"][:8] != UDF and ins.insn["after"] == ins.insn["before"]
    assert mnemonic(ins.disasm["armed"][0]) == "udf" and ins.disasm["armed"][0].endswith("#0x18")
    assert ins.insn["armed"][8:] == ins.insn["before"][8:]  # one word changed, the rest as it was
    # How the kernel will run the probed push: a copy from a slot, in the trap handler.
    assert ins.insn_facts["slot"] == "1" and ins.insn_facts["handler"].startswith("emulate_")
    assert "no single-step" in ins.insn_run and "undefined instruction" in ins.why
    assert kbridge_session.target.read_file(OPTIMIZATION).decode().strip() == "1"  # restored
    # Without --breakpoint the kernel optimizes even the entry: one `b` to a detour buffer.
    opt = inspect(kbridge_session, "ksys_write")
    assert opt.mode == "optimized" and mnemonic(opt.disasm["armed"][0]) == "b"
    assert opt.insn["after"] == opt.insn["before"] == ins.insn["before"]


def test_a_users_module_cross_built_and_probed(kbridge_vm: Guest, tmp_path: Path) -> None:
    cc = shutil.which(kbridge_vm.arch_info.gcc(12))
    assert cc, f"install {kbridge_vm.arch_info.gcc_package(12)} {kbridge_vm.arch_info.libc_dev_package()}"
    client = tmp_path / "kbchardev-client"
    subprocess.run([cc, "-static", "-O2", "-o", str(client), str(EXAMPLE / "client.c")], check=True)
    guest_client = kbridge_vm.push(client, "/tmp/kbchardev-client")
    mod = kbridge_vm.load_module(EXAMPLE, params={"debug": 1})
    assert "kbchardev: ready: /dev/kbchardev, debug=1" in mod.log
    run = kbridge_vm.probe(
        "kbchardev_write", ret=True, args={"count": 3}, run=f"echo hi > /dev/kbchardev; {guest_client} write hello"
    )
    assert [(h.args["count"], h.retval) for h in run.hits if h.handler == "ret"] == [(3, 3), (5, 5)]
    kbridge_vm.unload_module("kbchardev")
    assert "kbchardev" not in kbridge_vm.loaded_modules()


def test_breakpoint_lab_reference_solution(kbridge_vm: Guest, tmp_path: Path) -> None:
    d = tmp_path / "breakpoint-solution"
    labdir.write(get("breakpoint"), d, "solution")
    (report,) = check_dirs([d], kbridge_vm.arch, keep=True)
    assert report.skipped is None and report.ok, [(c.name, c.detail) for c in report.checks]
    assert len(report.checks) == len(get("breakpoint").checker.CHECKS)
    assert all(c.status is Status.PASS for c in report.checks)
