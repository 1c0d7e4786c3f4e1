"""Labs graded in real guests: every reference solution passes every check, every skeleton fails
the checks that need its missing code, one deliberate bug fails exactly its check, a compile error
and an oops are reported at the student's line, and a crashed VM is replaced.

Directories are graded in batches (one check_dirs call, one VM) to keep the VM time down.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from kbridge import kernels
from kbridge.api import Guest
from kbridge.arch import get_arch
from kbridge.images import image as images
from kbridge.labs import LABS, ablation, evidence, get, labdir
from kbridge.labs.checkers import kprobe_module
from kbridge.labs.context import LabContext
from kbridge.labs.grading import Report, Status
from kbridge.labs.guest import WORKLOAD, WORKLOAD_COMM, LogWatch, cleanup_guest_dir, install_workload
from kbridge.labs.kmodule import kprobes_list, loaded_modules
from kbridge.labs.parallel import check_parallel
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
    """One deliberate bug (or fake) in a reference solution, and the checks it must fail: those, no other."""

    lab: str
    check: str | tuple[str, ...]
    edits: tuple[tuple[str, str, str], ...]  # (file, old text, new text): every occurrence
    arches: tuple[str, ...] = ("x86_64",)  # the checkers are arch-neutral; arch-specific logic runs on both
    tag: str = ""  # tells apart two bugs failing the same check

    @property
    def checks(self) -> list[str]:
        return [self.check] if isinstance(self.check, str) else list(self.check)

    @property
    def name(self) -> str:
        return f"{self.lab}-{self.checks[0]}{self.tag}"


BOTH = ("x86_64", "arm64")
# Handlers that do nothing; init sets the counters to the README's old fixed total and the addresses to
# what the handlers would have seen.
_IDLE_HANDLERS = (
    ("kprobe_lab.c", "\tif (!wanted())\n\t\treturn 0;\n", "\treturn 0;\n"),
    ("kprobe_lab.c", "\tif (!wanted())\n\t\treturn;\n", "\treturn;\n"),
)
_INIT_SETS_EVERYTHING = (
    "kprobe_lab.c",
    '\tpr_info("planted kprobe at %px\\n", kp.addr);\n',
    '\tpr_info("planted kprobe at %px\\n", kp.addr);\n'
    "\tatomic_set(&pre_count, 25);\n\tatomic_set(&post_count, 25);\n"
    "\tlast_addr = (unsigned long)kp.addr;\n"
    "#ifdef CONFIG_X86_64\n\tlast_pre_ip = last_addr + 1;\n\tlast_post_ip = last_addr + 5;\n#else\n"
    "\tlast_pre_ip = last_addr;\n\tlast_post_ip = last_addr + 4;\n#endif\n",
)

# Edits applied in order, each to every occurrence: the post-handler's count goes first.
_POST_COUNT_GONE = ("kprobe_lab.c", "\tatomic_inc(&post_count);\n", "")
_PRE_COUNTS_POST = (
    "kprobe_lab.c",
    "\tatomic_inc(&pre_count);\n",
    "\tatomic_inc(&pre_count);\n\tatomic_inc(&post_count);\n",
)

OOPS_EDIT = (
    (
        "kprobe_lab.c",
        "\tatomic_inc(&pre_count);\n",
        "\tatomic_inc(&pre_count);\n\tif (atomic_read(&pre_count) == 3)\n\t\t*(volatile int *)p->symbol_name = 0;\n",
    ),
)

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
        BOTH,
        tag="no-probe",
    ),
    # A registered probe whose handlers do nothing, with every number set by init: the checker's own
    # count (on a workload size drawn per run) and the idle state before the workload give it away.
    Bug(
        "kprobe-module",
        ("pre-count", "post-count", "prints", "post-ip"),
        (*_IDLE_HANDLERS, _INIT_SETS_EVERYTHING),
        BOTH,
        tag="fake",
    ),
    Bug(
        "kprobe-module",
        "pre-count",
        (("kprobe_lab.c", "\tatomic_inc(&pre_count);\n", "\tatomic_inc(&pre_count);\n\tatomic_inc(&pre_count);\n"),),
    ),
    # post_count counted by the pre-handler, one per call like the real one; the post-handler still
    # prints and keeps its ip. Only the checker's ablation (the post-handler detached by its own
    # module for a second workload: post_count still moves) tells it apart.
    Bug(
        "kprobe-module",
        "post-count",
        (_POST_COUNT_GONE, _PRE_COUNTS_POST),
        BOTH,
        tag="-in-pre",
    ),
    # The same count with no post-handler attached at all: nothing prints after the single-step,
    # no post ip is kept.
    Bug(
        "kprobe-module",
        ("post-count", "prints", "post-ip"),
        (_POST_COUNT_GONE, _PRE_COUNTS_POST, ("kprobe_lab.c", "\t.post_handler = handler_post,\n", "")),
        BOTH,
        tag="-no-post-handler",
    ),
    Bug("kprobe-module", "prints", (("kprobe_lab.c", "p->addr = 0x%px", "p->addr = 0x%p"),)),
    Bug(
        "kprobe-module",
        "post-ip",
        (("kprobe_lab.c", "last_post_ip = instruction_pointer(regs);", "last_post_ip = last_pre_ip;"),),
        BOTH,
    ),
    Bug("kprobe-events", "filter", (("events.sh", "echo 'comm == \"kblab\"' >", ": "),)),
    # `>` truncates kprobe_events: the events other tools defined (the checker's, unknown to the
    # student) are gone after step_define.
    Bug(
        "kprobe-events",
        "define",
        (("events.sh", '"p:sys_write_event $sym" >> $T/kprobe_events', '"p:sys_write_event $sym" > $T/kprobe_events'),),
        BOTH,
        tag="truncates",
    ),
    # Clearing every event removes the student's too, and the other tools' with it.
    Bug(
        "kprobe-events",
        "clean",
        (("events.sh", "echo '-:kprobes/sys_write_event' >> $T/kprobe_events", "echo > $T/kprobe_events"),),
        BOTH,
        tag="clears",
    ),
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

# Honest work written differently from the reference: other names, extra prints, other formatting.
# Each must pass every check.
HONEST = {
    "kprobe-module-renamed": (
        "kprobe-module",
        (
            ("kprobe_lab.c", "handler_pre", "on_write_entry"),
            ("kprobe_lab.c", "handler_post", "after_single_step"),
            ("kprobe_lab.c", "static struct kprobe kp =", "static struct kprobe write_probe ="),
            ("kprobe_lab.c", "(&kp)", "(&write_probe)"),
            ("kprobe_lab.c", "kp.addr", "write_probe.addr"),
        ),
    ),
    "kprobe-module-chatty": (
        "kprobe-module",
        (
            (
                "kprobe_lab.c",
                "\tatomic_inc(&pre_count);\n",
                '\tatomic_inc(&pre_count);\n\tpr_info("hit %d from %s\\n", atomic_read(&pre_count), current->comm);\n',
            ),
            (
                "kprobe_lab.c",
                "p->addr = 0x%px, ip = %lx, flags = 0x%lx\\n",
                "pre: probe at %px | ip %lx | flags %lx\\n",
            ),
            (
                "kprobe_lab.c",
                "p->addr = 0x%px, pc = 0x%lx, pstate = 0x%lx\\n",
                "pre: probe at %px | pc %lx | pstate %lx\\n",
            ),
            (
                "kprobe_lab.c",
                '\tpr_info("planted kprobe at %px\\n", kp.addr);\n',
                '\tlast_addr = (unsigned long)kp.addr;\n\tpr_info("ready: %s\\n", kp.symbol_name);\n',
            ),
        ),
    ),
    "kprobe-events-styled": (
        "kprobe-events",
        (
            ("events.sh", "T=/sys/kernel/tracing", "T=/sys/kernel/debug/tracing"),
            (
                "events.sh",
                'echo "p:sys_write_event $sym" >> $T/kprobe_events',
                'echo "defining on $sym"\n\tprintf \'p:kprobes/sys_write_event %s\\n\' "$sym" >> $T/kprobe_events',
            ),
            (
                "events.sh",
                "echo '-:kprobes/sys_write_event' >> $T/kprobe_events",
                "echo -:sys_write_event >> $T/kprobe_events",
            ),
        ),
    ),
}
OLD_BUGS = [
    Bug("old-apis", "fault-handler", (("old_lab.c", "\t.fault_handler = handler_fault,\n", ""),)),
]


def make(
    tmp_path: Path,
    lab: str,
    which: str,
    name: str | None = None,
    edits: tuple[tuple[str, str, str], ...] = (),
    strict: bool = False,
) -> Path:
    """A lab directory as `kbridge lab start`/`solution` writes it, with EDITS applied (STRICT: each
    edit must change something, so a reference that moved on cannot turn a bug into a no-op)."""
    d = tmp_path / (name or f"{lab}-{which}")
    labdir.write(get(lab), d, which)
    applied = set()
    for i, (fname, old, new) in enumerate(edits):
        text = (d / fname).read_text()
        if old in text:
            (d / fname).write_text(text.replace(old, new))
            applied.add(i)
    missing = [old for i, (_, old, _) in enumerate(edits) if i not in applied]
    assert not (strict and missing), f"{name}: edits that matched nothing: {missing}"
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


def test_one_bug_fails_exactly_its_check_and_honest_variants_pass(kbridge_vm: Guest, tmp_path: Path) -> None:
    arch = kbridge_vm.arch
    bugs = [b for b in BUGS if arch in b.arches and arch in get(b.lab).arches]
    honest = {name: (lab, edits) for name, (lab, edits) in HONEST.items() if arch in get(lab).arches}
    if not bugs and not honest:
        pytest.skip(f"the deliberate bugs are checked on {', '.join(sorted({a for b in BUGS for a in b.arches}))}")
    dirs = [make(tmp_path, b.lab, "solution", b.name, b.edits, strict=True) for b in bugs]
    dirs += [make(tmp_path, lab, "solution", name, edits, strict=True) for name, (lab, edits) in honest.items()]
    reports = grade(arch, dirs)
    for bug, r in zip(bugs, reports, strict=False):
        assert failed(r) == bug.checks, f"{bug.name}:\n{show(r)}"
        assert not r.crashed and not r.vm_restarted
    for r in reports[len(bugs) :]:
        assert_solution(r)


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
    # gcc's diagnostic whole: the function it is in, file:line:column, the source line and its caret.
    assert detail.startswith(f"building {d} failed:")
    assert f"{d}/kprobe_lab.c: In function " in detail
    assert re.search(rf"{re.escape(str(d))}/kprobe_lab\.c:({line}|{line + 1}):\d+: error: ", detail), detail
    assert "| " in detail


def needs(lab: str, arch: str) -> None:
    """Skip a test of LAB on an arch its material is not written for (kbridge.labs.Lab.arches)."""
    if arch not in get(lab).arches:
        pytest.skip(f"{lab} runs on {', '.join(get(lab).arches)}")


def test_oops_fails_the_check_with_the_line_and_the_vm_is_replaced(kbridge_vm: Guest, tmp_path: Path) -> None:
    arch = kbridge_vm.arch
    needs("kprobe-module", arch)
    bad = make(tmp_path, "kprobe-module", "solution", "oops", OOPS_EDIT)
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
    assert r.crashed and r.vm_restarted and failed(r) == ["pre-count"], show(r)
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
    # Not unloaded (that would crash the kernel): the VM holding the module was replaced instead,
    # as a precaution: the kernel did not crash.
    assert r.vm_restarted and not r.crashed
    vm = QemuVM.attach(get_arch(arch))
    assert vm is not None and vm.proc.pid != pid and not (vm.rundir / "crashed").exists()
    try:
        assert "kprobe_lab" not in vm.read_file("/proc/modules").decode()
        assert "sys_write" not in vm.read_file("/sys/kernel/debug/kprobes/list").decode()
    finally:
        vm.detach()


def test_kprobe_module_detach_step_alone_and_refused_leaves_nothing(kbridge_vm: Guest, tmp_path: Path) -> None:
    """The checker's own module (the post-handler ablation) on a probe address with no student's kprobe
    finds nothing to detach and counts the calls; refused by the kernel (an address that is no
    function), it is a clear failure of the step. Either way nothing stays loaded."""
    needs("kprobe-module", kbridge_vm.arch)
    with kbridge_vm.session() as s:
        t = s.target
        install_workload(t)
        ctx = LabContext(t, s, tmp_path, {}, tmp_path, log=LogWatch(t))
        symbol = kprobe_module.wrapper_symbol(t.arch)
        addr = evidence.live_address(t, symbol)
        assert addr is not None
        try:
            d = ablation.detached_run(ctx, addr, "kprobe_lab", WORKLOAD_COMM, [WORKLOAD, "write", "3"], dict)
            # Its kprobe alone at the address (+4 past an IBT endbr64: x86_64 6.12): nothing to detach.
            assert d.addr - addr in (0, 4) and (d.hits, d.owned, d.detached, d.others) == (3, 0, 0, 0)
            assert ablation.NAME not in loaded_modules(t)
            with pytest.raises(
                ablation.AblationError, match=r"kbcheck_detach did not load \(-E[A-Z]+, .*register_kprobe"
            ):
                ablation.detached_run(ctx, 1, "kprobe_lab", WORKLOAD_COMM, [WORKLOAD, "write", "3"], dict)
        finally:
            for fn in reversed(ctx.cleanups):
                fn()
            cleanup_guest_dir(t)
        assert ablation.NAME not in loaded_modules(t)
        assert not [e for e in kprobes_list(t) if e[2].startswith(f"{symbol}+")]


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
def test_three_ways(bcc_kept: Guest, tmp_path: Path) -> None:
    arch = bcc_kept.arch
    needs("three-ways", arch)
    dirs = [make(tmp_path, "three-ways", "solution")]
    if arch == "x86_64":  # bcc compiles for a minute on emulated arm64: the skeleton runs on one arch
        dirs.append(make(tmp_path, "three-ways", "skeleton"))
    reports = grade(arch, dirs)
    assert_solution(reports[0])
    if len(reports) > 1:
        assert_skeleton(reports[1])


def test_jobs_grade_on_two_vms_in_order_and_a_crash_stays_in_its_vm(
    kbridge_arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kbridge_arch != "x86_64":
        pytest.skip("the workers are arch-neutral: the arm64 class timing is bench/bench_labs.py's")
    # Fresh VMs only (a state directory of this test's own): the session's kept VM is not used. Short:
    # a VM's unix sockets live under it (108 bytes at most), and pytest-xdist's tmp_path is long.
    state = Path(tempfile.mkdtemp(prefix="kbs-", dir="/tmp"))
    monkeypatch.setenv("KBRIDGE_STATE", str(state))
    oops = make(tmp_path, "kprobe-module", "solution", "oops", OOPS_EDIT, strict=True)
    good = make(tmp_path, "kprobe-module", "solution")
    fake = next(b for b in BUGS if b.tag == "fake")
    faked = make(tmp_path, fake.lab, "solution", fake.name, fake.edits, strict=True)
    events = make(tmp_path, "kprobe-events", "solution")
    dirs = [oops, good, faked, events]
    reports = list(check_parallel(dirs, kbridge_arch, jobs=2))
    assert [Path(r.directory) for r in reports] == dirs  # in the order given, whatever finished first
    crashed, *rest = reports
    assert crashed.crashed and crashed.vm_restarted and failed(crashed) == ["pre-count"], show(crashed)
    assert not any(r.crashed or r.vm_restarted for r in rest)
    assert_solution(rest[0])
    assert failed(rest[1]) == fake.checks
    assert_solution(rest[2])
    assert not list(state.glob("run-*"))  # every VM the workers booted was stopped
    shutil.rmtree(state)


def test_messages_name_the_cause(kbridge_vm: Guest, tmp_path: Path) -> None:
    if kbridge_vm.arch != "x86_64":
        pytest.skip("the messages are arch-neutral; the arch-specific one is the pre-handler test's")
    sym = make(
        tmp_path,
        "kprobe-module",
        "solution",
        "wrong-symbol",
        (("kprobe_lab.c", '"__x64_sys_write"', '"ksys_wirte"'),),
        True,
    )
    lic = make(
        tmp_path, "kprobe-module", "solution", "no-license", (("kprobe_lab.c", 'MODULE_LICENSE("GPL");', ""),), True
    )
    sleepy = make(
        tmp_path,
        "kprobe-module",
        "solution",
        "sleeps",
        (
            ("kprobe_lab.c", "\tatomic_inc(&pre_count);\n", "\tatomic_inc(&pre_count);\n\tmsleep(1);\n"),
            (
                "kprobe_lab.c",
                "#include <linux/seq_file.h>\n",
                "#include <linux/seq_file.h>\n#include <linux/delay.h>\n",
            ),
        ),
        True,
    )
    pipe = make(
        tmp_path,
        "kprobe-events",
        "solution",
        "trace-pipe",
        (("events.sh", "\tcat $T/trace\n", "\tcat $T/trace_pipe\n"),),
        True,
    )
    r_sym, r_lic, r_sleepy, r_pipe = grade("x86_64", [sym, lic, sleepy, pipe])

    loads = r_sym.checks[1]
    assert failed(r_sym) == ["loads"], show(r_sym)
    assert loads.detail.startswith("insmod failed: your init function returned -ENOENT (No such file or directory): ")
    assert "register_kprobe() found no symbol 'ksys_wirte' in this kernel (kprobe_lab.c:" in loads.detail
    assert ", TODO 1)" in loads.detail
    assert loads.detail.count("register_kprobe failed, returned -2") == 1  # init ran once
    assert "init must return 0" not in loads.hint

    assert failed(r_lic) == ["builds"] and "MODULE_LICENSE" in r_lic.checks[0].hint, show(r_lic)
    assert "C89" not in r_lic.checks[0].hint

    assert r_sleepy.crashed, show(r_sleepy)
    (bad,) = [c for c in r_sleepy.checks if c.status is Status.FAIL]
    assert bad.detail.startswith("your handler sleeps: handler_pre() called msleep(), which sleeps")

    # A step that blocks is a step timeout with its real time; the guest still answers: it is kept.
    assert not r_pipe.crashed and not r_pipe.vm_restarted, show(r_pipe)
    read = r_pipe.checks[[c.name for c in r_pipe.checks].index("read")]
    assert read.status is Status.FAIL
    assert re.fullmatch(
        r"step_read did not finish within 20 s \(stopped after 2\d\.\d s\); it was killed, the VM is kept", read.detail
    )
    assert "trace_pipe blocks until events come" in read.hint
    assert all(
        c.status is Status.SKIP and c.to_json().keys() == {"name", "status", "passed", "score", "reason"}
        for c in r_pipe.checks[5:]
    )
    for text in (c.detail for r in (r_sym, r_lic, r_sleepy, r_pipe) for c in r.checks):
        assert ".sock" not in text and "['" not in text  # no internal paths, no Python lists


def test_pre_handler_returning_non_zero_is_named(kbridge_vm: Guest, tmp_path: Path) -> None:
    arch = kbridge_vm.arch
    needs("kprobe-module", arch)
    d = make(
        tmp_path,
        "kprobe-module",
        "solution",
        "returns-1",
        (("kprobe_lab.c", "#endif\n\treturn 0;\n}\n\n/* Runs after", "#endif\n\treturn 1;\n}\n\n/* Runs after"),),
        True,
    )
    (r,) = grade(arch, [d])
    assert r.crashed and r.vm_restarted and failed(r) == ["pre-count"], show(r)
    detail = r.checks[3].detail
    symbol = "__x64_sys_write+0x1" if arch == "x86_64" else "BRK #4 at __arm64_sys_write+0x0"
    if detail.startswith("the guest kernel oopsed:"):
        # Resumed in the middle of an instruction, the CPU may run on a while and fault elsewhere (seen on
        # x86_64 under load: RIP ksys_pread64+0x3): the cause is named only from a fault at the probe.
        rip = re.search(r"RIP: [0-9a-f]{4}:(\S+)|pc : (\S+)", detail)
        assert rip and not (rip[1] or rip[2]).startswith(("__x64_sys_write+", "__arm64_sys_write+")), detail
        return
    assert detail.startswith("your pre_handler returned non-zero: the kernel then skips the probed instruction"), detail
    assert symbol in detail
    assert "return 0 from the pre-handler" in r.checks[3].hint
