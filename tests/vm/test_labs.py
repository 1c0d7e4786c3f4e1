"""Labs graded in real guests: every reference solution passes every check, every skeleton fails
the checks that need its missing code, one deliberate bug fails exactly its check, a compile error
and an oops are reported at the student's line, and a crashed VM is replaced.

Directories are graded in batches (one check_dirs call, one VM) to keep the VM time down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from kbridge import kernels
from kbridge.api import Guest
from kbridge.arch import get_arch
from kbridge.images import image as images
from kbridge.labs import LABS, get, labdir
from kbridge.labs.grading import Report, Status
from kbridge.labs.runner import check_dirs, kernel_available
from kbridge.targets.qemu import QemuVM

pytestmark = pytest.mark.vm

MODULE_LABS = ("kprobe-module", "kprobe-events", "kretprobe", "breakpoint")
# What a skeleton may pass: checks that need none of the code the student writes.
SKELETON_MAY_PASS = {
    "kprobe-module": {"builds", "loads"},
    "kprobe-events": set(),
    "kretprobe": {"builds", "loads"},
    "breakpoint": set(),
    "old-apis": {"builds", "loads"},
    "three-ways": {"builds", "loads", "bpf-attach"},
}


@dataclass(frozen=True)
class Bug:
    """One deliberate bug in a reference solution, and the one check it must fail."""

    lab: str
    check: str
    edits: tuple[tuple[str, str, str], ...]  # (file, old text, new text): every occurrence
    arches: tuple[str, ...] = ("x86_64",)  # the checkers are arch-neutral; arch-specific logic runs on both
    tag: str = ""  # tells apart two bugs failing the same check


BUGS = [
    Bug(
        "kprobe-module",
        "registered",
        (
            ("kprobe_lab.c", '"__x64_sys_write"', '"ksys_write"'),
            ("kprobe_lab.c", '"__arm64_sys_write"', '"ksys_write"'),
        ),
    ),
    # Prints and counts as if it worked, without a kprobe: the kernel's list says otherwise.
    Bug(
        "kprobe-module",
        "registered",
        (
            (
                "kprobe_lab.c",
                "\tret = register_kprobe(&kp);\n",
                "\tret = 0;\n\tatomic_set(&pre_count, 25);\n\tatomic_set(&post_count, 25);\n",
            ),
        ),
        tag="no-probe",
    ),
    Bug(
        "kprobe-module",
        "pre-count",
        (("kprobe_lab.c", "\tatomic_inc(&pre_count);\n", "\tatomic_inc(&pre_count);\n\tatomic_inc(&pre_count);\n"),),
    ),
    Bug("kprobe-module", "prints", (("kprobe_lab.c", "p->addr = 0x%px", "p->addr = 0x%p"),)),
    Bug(
        "kprobe-module",
        "post-ip",
        (("kprobe_lab.c", "last_post_ip = instruction_pointer(regs);", "last_post_ip = last_pre_ip;"),),
        ("x86_64", "arm64"),
    ),
    Bug("kprobe-events", "filter", (("events.sh", "echo 'comm == \"kblab\"' >", ": "),)),
    Bug(
        "kretprobe",
        "entry-data",
        (("kretprobe_lab.c", "regs_get_kernel_argument(regs, 2)", "regs_get_kernel_argument(regs, 1)"),),
    ),
    Bug("kretprobe", "nmissed", (("kretprobe_lab.c", "\tif (maxactive > 0)\n\t\trp.maxactive = maxactive;\n", ""),)),
    Bug(
        "breakpoint",
        "entry-mode",
        (
            ("answers.txt", "x86_64.entry_mode = ftrace", "x86_64.entry_mode = breakpoint"),
            ("answers.txt", "arm64.entry_mode = breakpoint", "arm64.entry_mode = ftrace"),
        ),
    ),
]
OLD_BUGS = [
    Bug("old-apis", "fault-handler", (("old_lab.c", "\t.fault_handler = handler_fault,\n", ""),)),
]


def make(
    tmp_path: Path, lab: str, which: str, name: str | None = None, edits: tuple[tuple[str, str, str], ...] = ()
) -> Path:
    """A lab directory as `kbridge lab start`/`solution` writes it, with EDITS applied."""
    d = tmp_path / (name or f"{lab}-{which}")
    labdir.write(get(lab), d, which)
    for fname, old, new in edits:
        text = (d / fname).read_text()
        if old in text:
            (d / fname).write_text(text.replace(old, new))
    return d


def grade(arch: str, dirs: list[Path], keep: bool = True) -> list[Report]:
    reports = list(check_dirs(dirs, arch, keep=keep))
    assert [Path(r.directory) for r in reports] == dirs
    return reports


def failed(r: Report) -> list[str]:
    return [c.name for c in r.checks if c.status is Status.FAIL]


def show(r: Report) -> str:
    return "\n".join(f"{c.name}: {c.status.value}: {c.detail[:300]}" for c in r.checks)


def assert_solution(r: Report) -> None:
    assert r.skipped is None and r.ok, show(r)
    assert len(r.checks) == len(get(r.lab).checker.CHECKS)
    assert all(c.status is Status.PASS for c in r.checks)


def assert_skeleton(r: Report) -> None:
    passed = {c.name for c in r.checks if c.passed}
    assert not r.ok and not r.crashed, show(r)
    assert passed <= SKELETON_MAY_PASS[r.lab], show(r)
    assert failed(r), "a skeleton must fail something, not only skip"


def test_solutions_pass_and_skeletons_fail(kbridge_vm: Guest, tmp_path: Path) -> None:
    labs = [lab for lab in MODULE_LABS if kbridge_vm.arch in get(lab).arches]
    dirs = [make(tmp_path, lab, which) for lab in labs for which in ("solution", "skeleton")]
    for r in grade(kbridge_vm.arch, dirs):
        (assert_solution if r.directory.endswith("-solution") else assert_skeleton)(r)


def test_one_bug_fails_exactly_its_check(kbridge_vm: Guest, tmp_path: Path) -> None:
    arch = kbridge_vm.arch
    bugs = [b for b in BUGS if arch in b.arches and arch in get(b.lab).arches]
    if not bugs:
        pytest.skip(f"the deliberate bugs are checked on {', '.join(sorted({a for b in BUGS for a in b.arches}))}")
    dirs = [make(tmp_path, b.lab, "solution", f"{b.lab}-{b.check}{b.tag}", b.edits) for b in bugs]
    for bug, r in zip(bugs, grade(arch, dirs), strict=True):
        assert failed(r) == [bug.check], f"{bug.lab} with a {bug.check} bug:\n{show(r)}"
        assert not r.crashed


def test_compile_error_points_at_the_students_line(kbridge_vm: Guest, tmp_path: Path) -> None:
    if kbridge_vm.arch != "x86_64":
        pytest.skip("the diagnostics path is the same on arm64 (cross gcc), covered by the x86_64 run")
    d = make(
        tmp_path,
        "kprobe-module",
        "solution",
        "broken",
        (("kprobe_lab.c", "\tatomic_inc(&post_count);\n", "\tatomic_inc(&post_count)\n"),),
    )
    line = next(
        i for i, ln in enumerate((d / "kprobe_lab.c").read_text().splitlines(), 1) if ln == "\tatomic_inc(&post_count)"
    )
    (r,) = grade("x86_64", [d])
    assert failed(r) == ["builds"] and all(c.status is Status.SKIP for c in r.checks[1:])
    detail = r.checks[0].detail
    # gcc reports the missing ';' at the next line; either way, in the student's file, with the source.
    assert f"{d}/kprobe_lab.c does not compile" in detail
    assert any(f"{d}/kprobe_lab.c:{n}: error: " in detail for n in (line, line + 1)), detail
    assert "| " in detail


def needs(lab: str, arch: str) -> None:
    """Skip a test of LAB on an arch its material is not written for (kbridge.labs.Lab.arches)."""
    if arch not in get(lab).arches:
        pytest.skip(f"{lab} runs on {', '.join(get(lab).arches)}")


def test_oops_fails_the_check_with_the_line_and_the_vm_is_replaced(kbridge_vm: Guest, tmp_path: Path) -> None:
    arch = kbridge_vm.arch
    needs("kprobe-module", arch)
    bad = make(
        tmp_path,
        "kprobe-module",
        "solution",
        "oops",
        (
            (
                "kprobe_lab.c",
                "\tatomic_inc(&pre_count);\n",
                "\tatomic_inc(&pre_count);\n\tif (atomic_read(&pre_count) == 3)\n"
                "\t\t*(volatile int *)p->symbol_name = 0;\n",
            ),
        ),
    )
    line = next(
        i
        for i, ln in enumerate((bad / "kprobe_lab.c").read_text().splitlines(), 1)
        if "*(volatile int *)p->symbol_name = 0;" in ln
    )
    good = make(tmp_path, "kprobe-module", "solution")
    before = QemuVM.attach(get_arch(arch))
    assert before is not None
    pid = before.proc.pid
    before.detach()
    r, after = grade(arch, [bad, good])
    assert r.crashed and failed(r) == ["pre-count"], show(r)
    check = r.checks[[c.name for c in r.checks].index("pre-count")]
    assert f"{bad}/kprobe_lab.c:{line} (handler_pre" in check.detail, check.detail
    assert "Oops" in check.detail or "Unable to handle" in check.detail
    assert "crashed" in check.hint
    assert all(c.status is Status.SKIP for c in r.checks[4:])
    # The crashed guest was replaced: the next directory ran in a fresh kept VM, and passed.
    assert_solution(after)
    vm = QemuVM.attach(get_arch(arch))
    assert vm is not None and vm.proc.pid != pid
    vm.detach()


def test_kprobe_left_behind_fails_unloads_and_the_vm_is_replaced(kbridge_vm: Guest, tmp_path: Path) -> None:
    arch = kbridge_vm.arch
    needs("kprobe-module", arch)
    d = make(
        tmp_path, "kprobe-module", "solution", "no-unregister", (("kprobe_lab.c", "\tunregister_kprobe(&kp);\n", ""),)
    )
    before = QemuVM.attach(get_arch(arch))
    assert before is not None
    pid = before.proc.pid
    before.detach()
    (r,) = grade(arch, [d])
    assert failed(r) == ["unloads"], show(r)
    assert "never calls unregister_kprobe()" in r.checks[-1].detail
    # Not unloaded (that would crash the kernel): the VM holding the module was replaced instead.
    assert r.crashed
    vm = QemuVM.attach(get_arch(arch))
    assert vm is not None and vm.proc.pid != pid and not (vm.rundir / "crashed").exists()
    try:
        assert "kprobe_lab" not in vm.read_file("/proc/modules").decode()
        assert "sys_write" not in vm.read_file("/sys/kernel/debug/kprobes/list").decode()
    finally:
        vm.detach()


def test_old_apis_on_5_10(kbridge_arch: str, tmp_path: Path) -> None:
    lab = LABS["old-apis"]
    needs(lab.name, kbridge_arch)
    # Built here when missing (about a minute): the lab's checks must run in CI, not be skipped.
    images.ensure(get_arch(kbridge_arch), kernels.resolve(lab.kernel))
    assert kernel_available(lab, get_arch(kbridge_arch)) is None
    bugs = [b for b in OLD_BUGS if kbridge_arch in b.arches]
    dirs = [make(tmp_path, "old-apis", "solution"), make(tmp_path, "old-apis", "skeleton")]
    dirs += [make(tmp_path, b.lab, "solution", f"old-{b.check}", b.edits) for b in bugs]
    sol, skel, *rest = grade(kbridge_arch, dirs, keep=False)  # one ephemeral 5.10 VM for the batch
    assert sol.kernel.startswith("5.10.")
    assert_solution(sol)
    assert_skeleton(skel)
    for bug, r in zip(bugs, rest, strict=True):
        assert failed(r) == [bug.check], f"old-apis with a {bug.check} bug:\n{show(r)}"


# Last: bcc_kept replaces the kept VM with one of the bcc image.
def test_three_ways(bcc_kept: QemuVM, tmp_path: Path) -> None:
    arch = bcc_kept.arch.name
    dirs = [make(tmp_path, "three-ways", "solution")]
    if arch == "x86_64":  # bcc compiles for a minute on emulated arm64: the skeleton runs on one arch
        dirs.append(make(tmp_path, "three-ways", "skeleton"))
    reports = grade(arch, dirs)
    assert_solution(reports[0])
    if len(reports) > 1:
        assert_skeleton(reports[1])
