"""What a lab check tells a student, on captured real output: crashes named by their cause, insmod's
errno decoded, compiler errors with a hint that fits them, step timeouts with the real time, JSON
that tells a crash from a precautionary restart, and lab READMEs whose check tables match the output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kbridge.arch import ARM64, X86_64
from kbridge.labs import LABS, get, markers
from kbridge.labs.checkers.kprobe_events import _function
from kbridge.labs.diagnose import build_hint, flood, load_failure, recognise
from kbridge.labs.evidence import OtherEvent, missing_others
from kbridge.labs.grading import CheckResult, CheckSpec, Grader, Report, Status, StepTimeout

DATA = Path(__file__).parent / "data"


def _text(name: str) -> str:
    return (DATA / name).read_text()


def test_pre_handler_returning_non_zero_is_named_on_x86_64() -> None:
    # Captured: 6.1 x86_64, a pre-handler returning 1 on an ftrace-based kprobe at __x64_sys_write+0:
    # the kernel resumed at +1, in the call's displacement, and died on an invalid opcode at +3.
    text = _text("lab-pre-handler-returns-1-x86_64.txt")
    found = recognise(text, X86_64, [("__x64_sys_write", 0)], "kprobe_lab")
    assert found is not None
    cause, hint = found
    assert cause.startswith("your pre_handler returned non-zero: the kernel then skips the probed instruction")
    assert "__x64_sys_write+0x1" in cause and "(at __x64_sys_write+0x3)" in cause
    assert "return 0" in hint
    # The same report with no probe of the student's there is not blamed on a pre-handler.
    assert recognise(text, X86_64, [("ksys_write", 0)], "kprobe_lab") is None


def test_pre_handler_returning_non_zero_is_named_on_arm64() -> None:
    # Captured: 6.1 arm64, the same module: the BRK traps forever (an RCU stall, then a soft lockup).
    text = _text("lab-pre-handler-returns-1-arm64.txt")
    found = recognise(text, ARM64, [("__arm64_sys_write", 0)], "kprobe_lab")
    assert found is not None
    assert "your pre_handler returned non-zero" in found[0] and "BRK #4 at __arm64_sys_write+0x0" in found[0]
    assert recognise(text, X86_64, [("__arm64_sys_write", 0)], "kprobe_lab") is None


def test_a_handler_that_sleeps_is_named() -> None:
    text = _text("lab-handler-sleeps-x86_64.txt")  # captured: msleep(1) in handler_pre, 6.1 x86_64
    found = recognise(text, X86_64, [("__x64_sys_write", 0)], "kprobe_lab")
    assert found is not None
    assert found[0].startswith("your handler sleeps: handler_pre() called msleep()")
    assert recognise(text, X86_64, [], None) is None  # no module of the student's: nothing to blame


def test_build_hints_fit_the_error() -> None:
    # Captured from `kbridge lab check` on 6.1 (gcc-12, the sandboxed kbuild).
    member = (
        "typo/kprobe_lab.c:90:10: error: 'struct kprobe' has no member named 'pre_handlr'; did you mean 'pre_handler'?"
    )
    hint = build_hint(member)
    assert hint is not None and "struct kprobe has no member 'pre_handlr' (gcc suggests 'pre_handler')" in hint
    assert "C89" not in hint
    assert "MODULE_LICENSE" in (build_hint("ERROR: modpost: missing MODULE_LICENSE() in nolic/kprobe_lab.o") or "")
    c90 = "x.c:3:9: warning: ISO C90 forbids mixed declarations and code [-Wdeclaration-after-statement]"
    assert "C89" in (build_hint(c90) or "")
    assert build_hint("x.c:1:1: error: expected ';' before '}' token") is None  # the lab's own hint then


REFERENCE = get("kprobe-module").source("kprobe_lab.c")


def test_enoent_from_init_names_the_symbol_and_its_todo() -> None:
    source = markers.solution(REFERENCE).replace('"__x64_sys_write"', '"ksys_wirte"')
    line = next(n for n, ln in enumerate(source.splitlines(), 1) if '"ksys_wirte"' in ln)
    said = ["kprobe_lab: register_kprobe failed, returned -2"]
    detail, hint = load_failure(2, said, source, "kprobe_lab.c", "register_kprobe", {"__x64_sys_write"})
    assert detail.startswith(
        "insmod failed: your init function returned -ENOENT (No such file or directory): "
        f"register_kprobe() found no symbol 'ksys_wirte' in this kernel (kprobe_lab.c:{line}, TODO 1)"
    )
    assert detail.count("returned -2") == 1
    assert hint is not None and "init must return 0" not in hint and "/proc/kallsyms" in hint


def test_unknown_symbol_without_a_license_is_named() -> None:
    source = markers.solution(REFERENCE).replace('MODULE_LICENSE("GPL");', "")
    said = ["kprobe_lab: Unknown symbol register_kprobe (err -2)"]
    detail, hint = load_failure(2, said, source, "kprobe_lab.c", "register_kprobe")
    assert "GPL modules only" in detail and "MODULE_LICENSE" in detail
    assert hint == 'add MODULE_LICENSE("GPL");'


def test_einval_says_not_probeable() -> None:
    detail, _ = load_failure(22, [], markers.solution(REFERENCE), "kprobe_lab.c", "register_kprobe")
    assert "-EINVAL" in detail and "cannot be probed" in detail


def test_a_flood_of_prints_is_named() -> None:
    # Measured: without the wanted() filter, 285636 lines for a 25-call workload.
    assert flood(285636, 25) is not None and "without the wanted() filter" in (flood(285636, 25) or "")
    assert flood(75, 25) is None  # an extra line per call is honest work


def test_step_timeout_says_the_real_time_and_that_the_vm_is_kept() -> None:
    e = StepTimeout("step_read", 20, 20.04)
    assert e.message == "step_read did not finish within 20 s (stopped after 20.0 s); it was killed, the VM is kept"
    assert "restarted" in StepTimeout("insmod x.ko", 60, 61.2, stuck=True).message


def test_step_function_body_is_found() -> None:
    script = "step_read() {\n\tcat $T/trace_pipe\n}\n\nstep_disable() {\n\techo 0 > x\n}\n"
    assert "trace_pipe" in _function(script, "step_read")
    assert "trace_pipe" not in _function(script, "step_disable")


def test_other_tools_events_are_found_whatever_maxactive_shows() -> None:
    others = [OtherEvent("r:tool_1/w ksys_write ret=$retval", "r0:tool_1/w ksys_write ret=$retval")]
    assert missing_others("r10:tool_1/w ksys_write ret=$retval\n", others) == []
    assert missing_others("p:kprobes/sys_write_event __x64_sys_write\n", others) == others


def test_json_tells_a_crash_from_a_restart_and_a_skip_has_only_its_reason() -> None:
    specs = [CheckSpec("a", "a", "hint a"), CheckSpec("b", "b", "hint b")]
    report = Report("kprobe-module", "d", "x86_64")
    g = Grader(specs, report)
    g.fail("a", "it failed")
    g.ready("b", "a")
    report.vm_restarted = True  # restarted as a precaution (a kprobe left behind), no crash
    obj = json.loads(json.dumps(g.finish().to_json()))
    assert obj["crashed"] is False and obj["vm_restarted"] is True
    assert obj["checks"][1] == {
        "name": "b",
        "status": "skip",
        "passed": False,
        "score": 0,
        "reason": "not run: needs a to pass first",
    }
    back = Report.from_json(obj)
    assert back.to_json() == obj
    assert back.checks[1] == CheckResult("b", Status.SKIP, "not run: needs a to pass first", "")


@pytest.mark.parametrize("name", list(LABS))
def test_lab_readme_check_table_matches_the_output(name: str) -> None:
    lab = LABS[name]
    text = lab.readme()
    section = text[text.index("## What the checks verify") :]
    rows = [m[1] for m in re.finditer(r"^\| ([a-z][a-z-]*) \|", section, re.M) if m[1] != "check"]
    assert rows == [c.name for c in lab.checker.CHECKS]
