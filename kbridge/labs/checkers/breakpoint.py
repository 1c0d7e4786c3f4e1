"""breakpoint: the student's predictions of what a kprobe plants, against kbridge inspect on the live kernel."""

from __future__ import annotations

import re

from kbridge.arch import ARCHES
from kbridge.errors import KbridgeError
from kbridge.inspect import Inspection, inspect
from kbridge.labs.context import LabContext
from kbridge.labs.grading import CheckSpec, Grader

SYMBOL = "ksys_write"
QUESTIONS = (
    "entry_mode",
    "entry_armed",
    "restored",
    "inner_offset",
    "inner_mode",
    "inner_armed",
    "noopt_mode",
    "noopt_armed",
)
MODES = ("ftrace", "optimized", "breakpoint")

CHECKS = [
    CheckSpec(
        "answers",
        "answers.txt answers every question for this arch",
        "write each answer after the '=' on the line for this arch (x86_64.NAME, arm64.NAME or arm.NAME)",
    ),
    CheckSpec(
        "entry-mode",
        f"entry_mode is how the kernel planted a kprobe at {SYMBOL}+0",
        "kbridge inspect ksys_write shows the mode: on x86_64 a function's first bytes are ftrace's "
        "5-byte nop, and a kprobe there becomes an ftrace callback (no trap at all); arm64 6.1 has "
        "no kprobes-on-ftrace and no optimization: always a BRK; arm optimizes the entry too",
    ),
    CheckSpec(
        "entry-armed",
        f"entry_armed is the instruction at {SYMBOL}+0 while armed",
        "the 'armed' lines of kbridge inspect: ftrace turns its nop into a call to its trampoline; "
        "a breakpoint is int3 (x86_64), brk #0x4 (arm64) or udf #0x18 (arm); an optimized probe a jmp "
        "(x86_64) or b (arm)",
    ),
    CheckSpec(
        "restored",
        "restored says whether the text is back to its original bytes after removal",
        "compare the 'before' and 'after' bytes: unregister_kprobe() puts the saved instruction back",
    ),
    CheckSpec(
        "inner-offset",
        f"the kernel accepts a kprobe at {SYMBOL}+inner_offset",
        "pick the address of an instruction from the disassembly (not the middle of one: -EILSEQ); "
        "on arm64 skip ksys_write+4, ftrace's call site, which 6.1 refuses; on arm the site is the "
        "`add sp, sp, #4` after `str lr, [sp, #-4]!` (push {lr}), refused too",
    ),
    CheckSpec(
        "inner-mode",
        "inner_mode is how the kernel planted the kprobe at inner_offset",
        "away from the ftrace site, x86_64 first plants an int3 and then, when the instructions "
        "under a 5-byte jump can be moved, optimizes it into a jmp to a detour (OPTPROBES); arm does "
        "the same with one 4-byte b; arm64 has no optimization",
    ),
    CheckSpec(
        "inner-armed",
        "inner_armed is the instruction planted at inner_offset",
        "an optimized probe is a jmp (e9 + rel32) or b (arm) to its detour buffer; a breakpoint is int3, brk or udf",
    ),
    CheckSpec(
        "noopt-mode",
        "noopt_mode is the mode at inner_offset with optimization off",
        "with /proc/sys/debug/kprobes-optimization = 0 (kbridge inspect --breakpoint) every kprobe "
        "away from an ftrace site is a breakpoint",
    ),
    CheckSpec(
        "noopt-armed",
        "noopt_armed is the breakpoint instruction itself",
        "x86_64: int3 (0xcc, one byte); arm64: brk #0x4 (0xd4200080, KPROBES_BRK_IMM); arm: udf #0x18 "
        "(0xe7f001f8, KPROBE_ARM_BREAKPOINT_INSTRUCTION, an undefined instruction)",
    ),
]

_LINE = re.compile(rf"^\s*(?P<arch>{'|'.join(ARCHES)})\.(?P<key>\w+)\s*=\s*(?P<value>.*?)\s*$")


def parse_answers(text: str, arch: str) -> dict[str, str]:
    """KEY -> answer for ARCH from 'ARCH.KEY = VALUE' lines (comments and the other arch ignored)."""
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line.split("#", 1)[0])
        if m and m["arch"] == arch and m["value"]:
            out[m["key"]] = m["value"].strip().lower()
    return out


def mnemonic(disasm_line: str) -> str:
    """The mnemonic in an 'addr: bytes mnemonic operands' line of kbridge.inspect.disassemble."""
    for tok in disasm_line.split(":", 1)[-1].split():
        if not re.fullmatch(r"[0-9a-f]{2}|[0-9a-f]{8}", tok):
            return tok
    return ""


def _armed(ins: Inspection) -> str:
    lines = ins.disasm.get("armed") or []
    return mnemonic(lines[0]) if lines else ""


def _compare(g: Grader, name: str, answer: str, seen: str, how: str) -> None:
    if not answer:
        g.fail(name, f"not answered (the kernel: {seen!r})")
        return
    g.result(name, answer == seen, f"you answered {answer!r}; the kernel: {seen!r} ({how})")


def _compare_site(g: Grader, which: str, ans: dict[str, str], ins: Inspection, how: str) -> None:
    """The WHICH-mode and WHICH-armed checks: the answers against what inspect saw at the site."""
    seen = ins.list_lines.get("armed", "")
    _compare(g, f"{which}-mode", ans.get(f"{which}_mode", ""), ins.mode or "", f"{how}: {seen}")
    armed = (ins.disasm.get("armed") or ["?"])[0]
    _compare(g, f"{which}-armed", ans.get(f"{which}_armed", ""), _armed(ins), f"armed: {armed}")


def run(ctx: LabContext, g: Grader) -> None:
    arch = ctx.target.arch.name
    ans = parse_answers(ctx.files["answers.txt"], arch)
    missing = [q for q in QUESTIONS if q not in ans]
    bad = [f"{q} = {ans[q]!r}" for q in ("entry_mode", "inner_mode", "noopt_mode") if ans.get(q, MODES[0]) not in MODES]
    if not ans.get("inner_offset", "0").removeprefix("0x").isalnum():
        bad.append(f"inner_offset = {ans['inner_offset']!r}")
    g.result(
        "answers",
        not missing and not bad,
        (f"unanswered for {arch}: {', '.join(missing)}. " if missing else "")
        + (f"not valid: {', '.join(bad)} (modes: {', '.join(MODES)}; offsets: a number)" if bad else "")
        or f"all {len(QUESTIONS)} questions answered for {arch}",
    )
    entry = inspect(ctx.session, SYMBOL)
    line = entry.list_lines.get("armed", "")
    _compare(g, "entry-mode", ans.get("entry_mode", ""), entry.mode or "", f"kprobes/list while armed: {line}")
    armed = _armed(entry)
    how = f"armed: {(entry.disasm.get('armed') or ['?'])[0]}"
    _compare(g, "entry-armed", ans.get("entry_armed", ""), armed, how)
    same = entry.insn.get("before") == entry.insn.get("after")
    _compare(
        g,
        "restored",
        ans.get("restored", ""),
        "yes" if same else "no",
        f"before {entry.insn.get('before', '')[:16]}, after {entry.insn.get('after', '')[:16]}",
    )
    try:
        offset = int(ans.get("inner_offset", ""), 0)
    except ValueError:
        g.fail("inner-offset", f"inner_offset {ans.get('inner_offset', '')!r} is not a number")
        return
    if offset <= 0:
        g.fail("inner-offset", f"inner_offset {offset} is not after the entry (+0)")
        return
    try:
        inner = inspect(ctx.session, SYMBOL, offset)
    except KbridgeError as e:
        g.fail("inner-offset", f"the kernel refused {SYMBOL}+{offset:#x}: {e.message}")
        return
    g.result("inner-offset", True, f"{SYMBOL}+{offset:#x} accepted: {inner.list_lines.get('armed', '')}")
    _compare_site(g, "inner", ans, inner, "kprobes/list while armed")
    noopt = inspect(ctx.session, SYMBOL, offset, force_breakpoint=True)
    if noopt.offset != offset:
        # inspect moved the probe off an ftrace site: that is not the student's offset any more.
        g.fail("noopt-mode", f"{SYMBOL}+{offset:#x} is an ftrace site: choose an offset past it")
        return
    _compare_site(g, "noopt", ans, noopt, "kprobes-optimization 0")
