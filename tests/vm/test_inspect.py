"""kbridge inspect on real guests: the bytes a kprobe writes, its mode, and the restore."""

from __future__ import annotations

import re

import pytest

from kbridge.errors import KbridgeError
from kbridge.inspect import OPTIMIZATION, find_list_line, inspect, render_inspect
from kbridge.session import Session

pytestmark = pytest.mark.vm

BRK_4 = "800020d4"  # BRK #4 (0xd4200080), little endian
UDF = "f801f0e7"  # 32-bit arm: 0xe7f001f8, KPROBE_ARM_BREAKPOINT_INSTRUCTION ("always"), little endian


def _unload_counts(session: Session, symbol: str, offset: int) -> tuple[int, int]:
    """hits and nmissed from the inspect module's own unload message (the last one in dmesg)."""
    module = render_inspect(symbol, offset).name
    log = session.target.run(["/bin/busybox", "dmesg"], timeout=30).stdout.decode(errors="replace")
    found = re.findall(rf"{module}: unloaded run=\S+ hits=(\d+) nmissed=(\d+)", log)
    assert found, f"no unload message of {module}"
    return int(found[-1][0]), int(found[-1][1])


def _optimization(session: Session) -> str | None:
    res = session.target.run(["/bin/busybox", "cat", OPTIMIZATION], timeout=30)
    return res.stdout.decode().strip() if res.ok else None


def test_entry_probe_bytes_and_mode(kbridge_session: Session) -> None:
    ins = inspect(kbridge_session, "ksys_write")
    assert ins.probe_address == ins.address
    assert not ins.blacklisted and ins.ftraceable
    assert ins.insn["before"] == ins.insn["after"], "the original bytes must be back after removal"
    assert ins.insn["armed"] != ins.insn["before"]
    assert "[DISABLED]" in ins.list_lines["before"]
    assert ins.list_lines["after"] == ""
    assert ins.hits > 0  # the armed probe really fired
    # The count inspect reports is the module's own, exactly what it says when unloaded.
    assert (ins.hits, ins.nmissed) == _unload_counts(kbridge_session, "ksys_write", 0)
    if kbridge_session.arch.name == "arm":
        # No kprobes-on-ftrace, but OPTPROBES: a pre-handler-only probe is one `b` even at the entry.
        assert ins.mode == "optimized" and "[OPTIMIZED]" in ins.list_lines["armed"]
        assert ins.disasm["armed"][0].split()[5] == "b"
        assert ins.insn["armed"][8:] == ins.insn["before"][8:]
        assert ins.insn_facts["slot"] == "1" and "detour buffer" in ins.insn_run
    elif kbridge_session.arch.name == "arm64":
        # 6.1 arm64 has no kprobes-on-ftrace: a BRK #4 (0xd4200080, little endian) at +0.
        assert ins.mode == "breakpoint"
        assert ins.insn["armed"][:8] == BRK_4
        assert ins.insn["before"][:8] != BRK_4
        assert "brk" in ins.disasm["armed"][0]
        assert "BRK #4" in ins.why and "every kprobe is one" in ins.why
    else:
        # x86_64: ksys_write+0 is the ftrace site: the 5-byte nop becomes a call to the trampoline.
        assert ins.mode == "ftrace" and ins.ftrace_site
        assert "[FTRACE]" in ins.list_lines["armed"]
        # The 5-byte nop ftrace patched in at boot: 0f 1f 44 00 00 on 6.1, 66 66 66 66 90 on 5.10 (ideal_nops).
        assert ins.insn["before"][:10] in ("0f1f440000", "6666666690")
        first, second = (int(line.split(":", 1)[0], 16) for line in ins.disasm["before"][:2])
        assert second - first == 5
        assert ins.insn["armed"][:2] == "e8"
        assert ins.insn["armed"][10:] == ins.insn["before"][10:]
        assert "ftrace site" in ins.why and "--breakpoint" in ins.why


def test_offset_probe_is_a_breakpoint_or_jump(kbridge_session: Session) -> None:
    name = kbridge_session.arch.name
    arm64 = name == "arm64"
    # arm64: past the ftrace site (+4); x86: after the 5-byte nop; arm: the second instruction.
    offset = {"arm64": 8, "arm": 4}.get(name, 5)
    ins = inspect(kbridge_session, "ksys_write", offset)
    assert ins.probe_address == ins.address + offset
    assert ins.insn["before"] == ins.insn["after"]
    if name == "arm":
        assert ins.mode in ("optimized", "breakpoint")
        assert ins.insn["armed"][:8] == UDF if ins.mode == "breakpoint" else ins.disasm["armed"][0].split()[5] == "b"
    elif arm64:
        assert ins.mode == "breakpoint" and ins.insn["armed"][:8] == BRK_4
    else:
        # A non-ftrace x86 probe starts as int3 and is optimized into a 5-byte jump.
        assert ins.mode in ("optimized", "breakpoint")
        assert ins.insn["armed"][:2] == ("e9" if ins.mode == "optimized" else "cc")
        if ins.mode == "optimized":
            assert "--breakpoint" in ins.why and OPTIMIZATION in ins.why


def test_breakpoint_mode_plants_int3_or_brk_and_restores_everything(kbridge_session: Session) -> None:
    arm64 = kbridge_session.arch.name == "arm64"
    optimization_before = _optimization(kbridge_session)
    ins = inspect(kbridge_session, "ksys_write", force_breakpoint=True)
    assert ins.mode == "breakpoint"
    assert ins.insn["before"] == ins.insn["after"] != ins.insn["armed"]
    assert ins.list_lines["after"] == "" and ins.hits > 0
    assert _optimization(kbridge_session) == optimization_before  # restored
    if kbridge_session.arch.name == "arm":
        # No ftrace site at +0 to move past; the optimizer was off while armed, then restored.
        assert ins.offset == 0 and ins.insn["armed"][:8] == UDF and ins.insn["armed"][8:] == ins.insn["before"][8:]
        assert any(f"restored to {optimization_before}" in c for c in ins.changes)
        assert "UDF #24" in ins.why and "no single-step" in ins.why
    elif arm64:
        assert ins.offset == 0 and ins.insn["armed"][:8] == BRK_4
        assert optimization_before is None  # no OPTPROBES on arm64: nothing was changed
    else:
        # +0 is the ftrace site (5 bytes): the breakpoint goes on the instruction after it.
        assert ins.requested_offset == 0 and ins.offset == 5
        assert ins.probe_address == ins.address + 5
        assert ins.insn["armed"][:2] == "cc" and ins.insn["armed"][2:] == ins.insn["before"][2:]
        assert ins.disasm["armed"][0].endswith("int3")
        assert any("ftrace site" in c for c in ins.changes)
        if optimization_before != "0":
            assert any(f"restored to {optimization_before}" in c for c in ins.changes)
        assert "int3 (0xcc)" in ins.why
    assert (ins.hits, ins.nmissed) == _unload_counts(kbridge_session, "ksys_write", ins.offset)


def test_bad_offset_is_refused_and_nothing_stays(kbridge_session: Session) -> None:
    arm64 = kbridge_session.arch.name in ("arm64", "arm")  # fixed 4-byte instructions
    with pytest.raises(KbridgeError) as e:
        inspect(kbridge_session, "ksys_write", 2 if arm64 else 1)
    # Measured on 6.1: x86_64 -EILSEQ (inside an instruction), arm64 and arm -EINVAL (not 4-byte aligned).
    assert ("-EINVAL" if arm64 else "-EILSEQ") in e.value.message
    assert ("multiple of 4" if arm64 else "inside an instruction") in e.value.message
    assert not any(m.startswith("kb_insp_") for m in kbridge_session.loaded_modules())
    assert find_list_line(kbridge_session.kprobes_list(), "ksys_write", 1) == ""


def test_arm64_ftrace_site_refusal_names_the_cause(kbridge_session: Session) -> None:
    if kbridge_session.arch.name != "arm64":
        pytest.skip("x86_64 probes its ftrace site through ftrace (see test_entry_probe_bytes_and_mode)")
    with pytest.raises(KbridgeError) as e:
        inspect(kbridge_session, "ksys_write", 4)
    # arm64 6.1 returns -EINVAL here (check_ftrace_location() without KPROBES_ON_FTRACE), not -EILSEQ.
    assert "-EINVAL" in e.value.message and "ftrace call site" in e.value.message
    assert "ksys_write+0x4" in e.value.message
    assert not any(m.startswith("kb_insp_") for m in kbridge_session.loaded_modules())


def test_blacklisted_symbol_is_reported(kbridge_session: Session) -> None:
    # Each arch's own breakpoint handler (arm: the undefined-instruction hook, kprobe_trap_handler;
    # its kprobe_handler is inlined into it on 6.1 armmp, no symbol of its own).
    sym = {"x86_64": "kprobe_int3_handler", "arm": "kprobe_trap_handler"}.get(
        kbridge_session.arch.name, "kprobe_breakpoint_handler"
    )
    ins = inspect(kbridge_session, sym)
    assert ins.blacklisted and ins.mode == "blacklisted" and not ins.insn
