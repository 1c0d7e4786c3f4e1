"""Kernel drift, each shown on the kernel where it matters, in real guests.

The default run covers bullseye (5.10) and trixie (6.12) on x86_64 and sid (newest)
on arm64; every other kernel x arch (32-bit arm on every suite among them) carries the
`matrix` marker (deselected by default; `pytest -m matrix tests/vm/test_matrix.py` runs
the whole matrix).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from kbridge import kernels, kprobe_events, targets
from kbridge.arch import get_arch
from kbridge.images.grammar import grammar_of
from kbridge.kprobe_events.grammar import NEWEST_KNOWN
from kbridge.targets import acquire
from kbridge.targets.base import Target
from tests.unit.test_events_kernels import KERNEL_ONLY
from tests.vm import cli
from tests.vm.error_log_capture import DATA, corpus, live_verdicts

ARCHES = ("x86_64", "arm64", "arm")
DEFAULT_RUN = {("bullseye", "x86_64"), ("trixie", "x86_64"), ("sid", "arm64")}
TRACING = "/sys/kernel/tracing"


def kernels_where(pred=lambda suite, arch: True) -> list:  # type: ignore[no-untyped-def]
    """Every (suite, arch) of the matrix satisfying PRED; those outside DEFAULT_RUN marked `matrix`."""
    return [
        pytest.param(s, a, id=f"{s}-{a}", marks=() if (s, a) in DEFAULT_RUN else (pytest.mark.matrix,))
        for s in kernels.SUITES
        for a in ARCHES
        if pred(s, a)
    ]


@pytest.fixture(scope="module")
def guests() -> Iterator[dict]:
    """One booted guest per (suite, arch) for the module, shut down at its end.

    Each is a fresh VM of its own, never the kept VM of that kernel (the session's kbridge_vm, or
    `kbridge vm up`): attaching that one would hold its lock for the whole module, and every
    `kbridge` command these tests start on the same kernel would wait for it (600 s, then fail).
    """
    with ExitStack() as stack:
        booted: dict[tuple[str, str], Target] = {}

        def get(suite: str, arch: str) -> Target:
            if (suite, arch) not in booted:
                booted[suite, arch] = stack.enter_context(acquire(arch, kernel=suite, reuse_kept=False))
            return booted[suite, arch]

        yield get  # type: ignore[misc]


@pytest.mark.matrix  # boots a kept arm VM of its own: with the matrix, not in the default run
def test_guests_leave_the_kept_vm_to_the_commands(guests):
    """With a kept VM of a kernel up, the module's guest of that kernel is another VM: a `kbridge`
    command started meanwhile attaches the kept one at once instead of waiting for its lock."""
    arch, suite = get_arch("arm"), "bookworm"  # the kept VM tests/vm/test_arm.py's session boots
    kept = targets.kept(arch, suite)
    booted = kept is None
    if kept is None:
        kept = targets.boot(arch, suite, keep=True)
    krel = kept.krel
    kept.release()
    try:
        guest = guests(suite, arch.name)
        assert not guest.kept, guest.describe()
        proc = cli.run("vm", "exec", "--arch", arch.name, "--kernel", suite, "--", "uname", "-r", timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == krel
    finally:
        if booted and (again := targets.kept(arch, suite)) is not None:
            targets.shutdown(again)


def _sh(guest: Target, script: str) -> str:
    res = guest.run(["/bin/busybox", "sh", "-c", script], timeout=120)
    out = res.stdout
    return out.decode() if isinstance(out, bytes) else out


@pytest.mark.parametrize(("suite", "arch"), kernels_where(lambda s, a: (DATA / f"{s}-{a}.json").is_file()))
def test_error_log_verdicts_are_the_captured_ones(guests, suite, arch):
    """The kernel's error_log still says what was captured, and the offline grammar agrees."""
    guest = guests(suite, arch)
    captured = json.loads((DATA / f"{suite}-{arch}.json").read_text())
    live = live_verdicts(guest, corpus())
    assert live == captured["verdicts"], (
        f"{guest.krel} answers differently from the capture of {captured['krel']}: "
        "re-capture with python -m tests.vm.error_log_capture"
    )
    grammar = grammar_of(get_arch(arch), suite)  # from the image's own .config
    for v in live:
        if v["line"] in KERNEL_ONLY:
            continue
        try:
            kprobe_events.parse(v["line"], grammar)
            assert v["ok"], v
        except kprobe_events.EventSyntaxError as e:
            assert not v["ok"] and e.kernel_position == v["kernel_position"], (v, e)


def _trampoline(suite: str, arch: str) -> str:
    """Where a kretprobe'd function returns to, by kernel: the symbol names changed twice."""
    version = kernels.SUITES[suite].major_minor or NEWEST_KNOWN
    if version < (5, 11):
        return "kretprobe_trampoline"  # renamed __kretprobe_trampoline in 5.11
    if arch == "x86_64":
        return "arch_rethook_trampoline"  # x86 moved kretprobes onto rethook in 5.19
    return "__kretprobe_trampoline"  # arm64 and arm kept kprobes' own trampoline (7.2 still)


@pytest.mark.parametrize(("suite", "arch"), kernels_where())
def test_symbols_are_the_images_own(guests, suite, arch):
    """Each image has its own symbol table: syscall entry and kretprobe trampoline by version."""
    from kbridge.session import Session

    session = Session(guests(suite, arch))
    assert session.image.suite == suite
    res = session.resolve("sys_write")
    assert res.symbol == session.image.arch.syscall_entry("write"), res  # sys_write itself on arm
    table = session.symbols
    want = _trampoline(suite, arch)
    others = {"kretprobe_trampoline", "__kretprobe_trampoline", "arch_rethook_trampoline"} - {want}
    assert table.text(want), f"{want} missing on {session.image.krel}"
    assert not [t for t in others if table.text(t)], f"{others} on {session.image.krel}"
    assert session.blacklist and "ksys_write" not in session.blacklist  # the image's own, read live


def _kprobes_list(guest: Target, line: str) -> str:
    """Define LINE, return debugfs kprobes/list while it is armed, then remove it."""
    group_event = line.split()[0].split(":", 1)[1]
    out = _sh(
        guest,
        f"cd {TRACING} && printf '%s\\n' '{line}' >> kprobe_events && "
        f"echo 1 > events/{group_event}/enable && cat /sys/kernel/debug/kprobes/list; "
        f"echo 0 > events/{group_event}/enable; echo '-:{group_event}' >> kprobe_events",
    )
    assert group_event.split("/")[1] not in _sh(guest, f"cat {TRACING}/kprobe_events")
    return out


@pytest.mark.parametrize(("suite", "arch"), kernels_where(lambda s, a: a == "x86_64"))
def test_entry_probe_lands_after_endbr64_on_ibt_kernels(guests, suite, arch):
    """x86 IBT (trixie's 6.12 on) starts functions with endbr64: kprobes move an entry probe to +4."""
    guest = guests(suite, arch)
    listing = _kprobes_list(guest, "p:kbibt/w ksys_write")
    line = next(ln for ln in listing.splitlines() if "ksys_write" in ln)
    ibt = grammar_of(get_arch(arch), suite).ibt
    assert ibt == (suite in ("trixie", "sid"))
    assert ("ksys_write+0x4" if ibt else "ksys_write+0x0") in line, line
    assert "[FTRACE]" in line  # both: ftrace's call sits right at the (moved) entry


@pytest.mark.parametrize(("suite", "arch"), kernels_where(lambda s, a: a == "arm64"))
def test_arm64_refuses_the_ftrace_call_site(guests, suite, arch):
    """arm64 (no KPROBES_ON_FTRACE) refuses SYM+4, the patched ftrace call; SYM+0 works."""
    guest = guests(suite, arch)
    out = _sh(
        guest,
        f"cd {TRACING} && : > error_log; "
        "printf 'p:kbft/a ksys_write+4\\n' >> kprobe_events; echo rc=$?; cat error_log; "
        "printf 'p:kbft/b ksys_write\\n' >> kprobe_events; echo rc=$?; : > kprobe_events",
    )
    entries = kprobe_events.parse_error_log(out)
    assert "rc=1" in out and out.count("rc=0") == 1, out
    assert [e.error_class for e in entries] == ["FAIL_REG_PROBE"], out


@pytest.mark.parametrize(("suite", "arch"), kernels_where(lambda s, a: a == "arm" and s == "bookworm"))
def test_arm_refuses_argn_and_the_ftrace_call_site(guests, suite, arch):
    """32-bit arm: no $argN (no HAVE_FUNCTION_ARG_ACCESS_API: BAD_VAR) and no kprobes-on-ftrace: the
    call site after the prologue (ksys_write+0xc on 6.1: `bl __gnu_mcount_nc`, `add sp, sp, #4` while
    off) fails to register; the entry and %r0 work."""
    guest = guests(suite, arch)
    out = _sh(
        guest,
        f"cd {TRACING} && : > error_log; "
        "printf '%s\\n' 'p:kbarm/a ksys_write fd=$arg1' >> kprobe_events; echo rc=$?; "
        "printf '%s\\n' 'p:kbarm/b ksys_write+0xc' >> kprobe_events; echo rc=$?; cat error_log; "
        "printf '%s\\n' 'p:kbarm/c ksys_write fd=%r0' >> kprobe_events; echo rc=$?; : > kprobe_events",
    )
    entries = kprobe_events.parse_error_log(out)
    assert out.count("rc=1") == 2 and out.count("rc=0") == 1, out
    assert [e.error_class for e in entries] == ["BAD_VAR", "FAIL_REG_PROBE"], out


@pytest.mark.parametrize(("suite", "arch"), kernels_where())
def test_module_built_with_the_suites_compiler_fires(suite, arch):
    """kmod pre + kretprobe: host gcc-12 (5.10, 6.1) or the suite's build root (6.12, sid);
    the template's kretprobe code compiles against ri->rp (5.10) and get_kretprobe() (5.11+)."""
    proc = cli.run(
        "probe",
        "ksys_write",
        "--pre",
        "--ret",
        "--kernel",
        suite,
        "--arch",
        arch,
        "--json",
        "--run",
        "echo hi > /dev/null",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    counters = summary["mechanisms"]["kmod"]["counters"]
    assert counters.get("pre", 0) >= 1 and counters.get("ret", 0) >= 1, summary
    version = kernels.SUITES[suite].major_minor
    if version is not None:
        assert kernels.version_tuple(summary["kernel"]) == version


@pytest.mark.parametrize(("suite", "arch"), kernels_where(lambda s, a: a == "x86_64"))
def test_inspect_shows_where_the_kernel_plants_an_entry_probe(suite, arch):
    """`kbridge inspect ksys_write`: the armed probe's kprobes/list line names the real offset."""
    proc = cli.run("inspect", "ksys_write", "--kernel", suite, "--arch", arch, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    armed = report["kprobes_list"]["armed"]
    ibt = suite in ("trixie", "sid")
    assert ("ksys_write+0x4" if ibt else "ksys_write+0x0") in armed, report
    assert report["mode"] == "ftrace"


@pytest.mark.parametrize(
    ("suite", "arch"),
    [pytest.param(s, a, id=f"{s}-{a}", marks=pytest.mark.matrix) for s in kernels.SUITES for a in ARCHES],
)
def test_three_mechanisms_agree(suite, arch):
    """compare: kmod, tracefs and eBPF (that suite's bcc image) count the same hits (bpf said skipped,
    with why, on arm)."""
    proc = cli.run(
        "compare",
        "ksys_write",
        "--comm",
        "dd",
        "--run",
        "dd if=/dev/zero of=/dev/null bs=1 count=50",
        "--kernel",
        suite,
        "--arch",
        arch,
        timeout=1800,
        env={**os.environ, "COLUMNS": "250"},  # the skipped reason on one line
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "every mechanism counted the same hits" in proc.stdout + proc.stderr
    if not get_arch(arch).bpf_target:  # the bpf mechanism refuses the arch before bcc is asked
        assert f"skipped: kbridge's eBPF probe is built for x86_64 and arm64, not {arch}" in proc.stdout


@pytest.mark.parametrize(("suite", "arch"), kernels_where(lambda s, a: a == "x86_64"))
def test_kretprobe_past_endbr64_is_an_entry_only_with_ibt(suite, arch):
    """`r ksys_write+4`: a function entry on IBT kernels (it fires), BAD_RETPROBE elsewhere (before any boot)."""
    event = "r:kbibt/r ksys_write+4 ret=$retval"
    proc = cli.run(
        "trace", event, "--kernel", suite, "--arch", arch, "--json", "--count", "1", "--run", "echo hi > /dev/null"
    )
    if grammar_of(get_arch(arch), suite).ibt:
        assert proc.returncode == 0, proc.stderr[-2000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
        assert summary["kernel"].startswith(("6.12", "7.")), summary
        assert summary["mechanisms"]["tracefs"]["counters"]["kbibt/r"] >= 1, summary
        hit = json.loads(proc.stdout.splitlines()[0])
        assert hit["handler"] == "ret" and hit["retval"] == 3  # "hi\n": 3 bytes written
    else:
        assert proc.returncode == 2
        assert "BAD_RETPROBE" in proc.stdout + proc.stderr
        assert "booting" not in proc.stderr  # refused offline
