"""The offline grammar per kernel agrees with each real kernel's error_log.

tests/unit/data/error_log/<suite>-<arch>.json hold what Debian's kernels (5.10,
6.1, 6.12, 7.2 on x86_64 and arm64; 6.1 on 32-bit arm) answered to every line of corpus.txt, captured
from real guests by tests/vm/error_log_capture.py; tests/vm/test_matrix.py re-checks
them live.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kbridge import kprobe_events
from kbridge.arch import ARM64, X86_64, get_arch
from kbridge.kprobe_events import EventSyntaxError, Grammar, parse
from kbridge.kprobe_events.grammar import ERROR_CLASSES, NEWEST_KNOWN, OLD_MESSAGES


def grammar_for(kernel: str, arch: str, **facts: object) -> Grammar:
    """The suite table's grammar (not a built image's: these tests run on machines without images)."""
    return kprobe_events.grammar_for(kernel, get_arch(arch), **facts)  # type: ignore[arg-type]


DATA = Path(__file__).parent / "data/error_log"
CAPTURES = sorted(DATA.glob("*-*.json"))

# Verdicts only the running kernel can give: they depend on the probed function's
# instructions or on the symbol table, not on the line's grammar.
KERNEL_ONLY = {
    # x86 without IBT: +4 is inside the 5-byte fentry call (BAD_INSN_BNDRY);
    # arm64: +4 is the ftrace call site, which kprobes refuse (FAIL_REG_PROBE).
    "p:kb/ok ksys_write+4",
    # arm64 before 6.12: jiffies is a linker alias, absent from kallsyms.
    "p:kb/ok ksys_write a=@jiffies",
}


def _captures() -> list[tuple[str, dict, dict]]:
    out = []
    for path in CAPTURES:
        data = json.loads(path.read_text())
        for v in data["verdicts"]:
            out.append((path.stem, data, v))
    return out


def _kernel_class(v: dict) -> str | None:
    if v["error"]:
        return v["error"]
    if v["message"]:
        return ERROR_CLASSES.get(v["message"]) or OLD_MESSAGES.get(v["message"])
    return None


def test_every_suite_and_arch_was_captured():
    assert {p.stem for p in CAPTURES} == {
        f"{s}-{a}" for s in ("bullseye", "bookworm", "trixie", "sid") for a in ("x86_64", "arm64")
    } | {"bookworm-arm"}


@pytest.mark.parametrize(
    ("capture", "data", "verdict"), _captures(), ids=[f"{c}:{v['line']}" for c, _, v in _captures()]
)
def test_offline_verdict_matches_the_kernel(capture, data, verdict):
    if verdict["line"] in KERNEL_ONLY:
        pytest.skip("decided by the running kernel's code and symbols, not by the grammar")
    # The suite table's facts, not a built image's: this runs on machines without images.
    grammar = grammar_for(data["suite"], data["arch"])
    try:
        parse(verdict["line"], grammar)
    except EventSyntaxError as e:
        assert not verdict["ok"], f"offline rejects what {data['krel']} accepted: {e}"
        assert (e.error, e.kernel_position) == (_kernel_class(verdict), verdict["kernel_position"])
        if verdict["message"]:
            # 5.10.y fixed "$-valiable" between 5.10.223 (bullseye's point release)
            # and 5.10.262 (bullseye-security): both spellings are the same class.
            assert e.message == verdict["message"] or OLD_MESSAGES.get(verdict["message"]) == e.error
        return
    assert verdict["ok"], f"offline accepts what {data['krel']} rejected: {verdict}"


def test_kernel_only_lines_do_differ_between_kernels():
    # Guards KERNEL_ONLY from hiding grammar bugs: each such line is accepted somewhere.
    for line in KERNEL_ONLY:
        fates = {
            json.loads(p.read_text())["verdicts"][i]["ok"]
            for p in CAPTURES
            for i, v in enumerate(json.loads(p.read_text())["verdicts"])
            if v["line"] == line
        }
        assert fates == {True, False}


@pytest.mark.parametrize(
    ("kernel", "arch", "expected"),
    [
        ("5.10", "x86_64", Grammar((5, 10), X86_64)),
        ("bookworm", "arm64", Grammar((6, 1), ARM64)),
        ("6.12", "x86_64", Grammar((6, 12), X86_64, ibt=True, btf_args=True)),
        ("trixie", "aarch64", Grammar((6, 12), ARM64, ibt=False, btf_args=True)),
        ("latest", "x86_64", Grammar(NEWEST_KNOWN, X86_64, ibt=True, btf_args=True)),
    ],
)
def test_suite_table_grammar(kernel, arch, expected):
    assert grammar_for(kernel, arch) == expected


def test_grammar_from_a_kernel_config():
    config = {"CONFIG_X86_KERNEL_IBT": "y", "CONFIG_PROBE_EVENTS_BTF_ARGS": "y"}
    g = grammar_for("sid", "x86_64", config=config, krel="7.2.13+deb14-amd64")
    assert g == Grammar((7, 2), X86_64, ibt=True, btf_args=True)
    assert g.entry_offset_max() == 4
    assert Grammar((7, 2), ARM64, ibt=True).entry_offset_max() == 0


@pytest.mark.parametrize(
    ("line", "old", "new"),
    [
        # (line, error on 5.10/6.1, error on 6.12) from the captures, as a readable summary.
        ("p ksys_write s=+0($arg2):char", "BAD_TYPE", None),
        ("r ksys_write fd=$arg1", "BAD_VAR", None),
        ("p ksys_write fd", "BAD_FETCH_ARG", None),
        ("p ksys_write $arg*", "BAD_VAR", None),
        ("r ksys_write+4", "BAD_RETPROBE", None),
        ("p ksys_write c=$comm:u8", None, "NEED_STRING_TYPE"),
    ],
)
def test_drift_between_6_1_and_6_12(line, old, new):
    for kernel, want in (("6.1", old), ("6.12", new)):
        g = grammar_for(kernel, "x86_64")
        try:
            parse(line, g)
            got = None
        except EventSyntaxError as e:
            got = e.error
            assert e.error is not None or want is None
        assert got == want, (kernel, line)


def test_btf_argument_round_trips():
    g = grammar_for("6.12", "x86_64")
    ev = parse("p:kb/w ksys_write fd $arg*", g)
    assert [a.fetch for a in ev.args] == [kprobe_events.BtfArg("fd"), kprobe_events.AllArgs()]
    assert kprobe_events.format(ev) == "p:kb/w ksys_write fd $arg*"


def test_5_10_rejects_symstr_and_hyphenated_groups():
    g = grammar_for("bullseye", "x86_64")
    with pytest.raises(EventSyntaxError, match="BAD_TYPE"):
        parse("p ksys_write s=$arg1:symstr", g)
    with pytest.raises(EventSyntaxError, match="BAD_GROUP_NAME"):
        parse("p:my-grp/e ksys_write", g)
