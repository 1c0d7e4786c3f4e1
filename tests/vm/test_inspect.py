"""kbridge inspect on real guests: the bytes a kprobe writes, its mode, and the restore."""

from __future__ import annotations

import pytest

from kbridge.errors import KbridgeError
from kbridge.inspect import find_list_line, inspect
from kbridge.session import Session

pytestmark = pytest.mark.vm


def test_entry_probe_bytes_and_mode(kbridge_session: Session) -> None:
    ins = inspect(kbridge_session, "ksys_write")
    assert ins.probe_address == ins.address
    assert not ins.blacklisted and ins.ftraceable
    assert ins.insn["before"] == ins.insn["after"], "the original bytes must be back after removal"
    assert ins.insn["armed"] != ins.insn["before"]
    assert "[DISABLED]" in ins.list_lines["before"]
    assert ins.list_lines["after"] == ""
    assert ins.hits > 0  # the armed probe really fired
    if kbridge_session.arch.name == "arm64":
        # 6.1 arm64 has no kprobes-on-ftrace: a BRK #4 (0xd4200080, little endian) at +0.
        assert ins.mode == "breakpoint"
        assert ins.insn["armed"][:8] == "800020d4"
        assert ins.insn["before"][:8] != "800020d4"
        assert "brk" in ins.disasm["armed"][0]
    else:
        # x86_64: ksys_write+0 is the ftrace site: the 5-byte nop becomes a call to the trampoline.
        assert ins.mode == "ftrace"
        assert "[FTRACE]" in ins.list_lines["armed"]
        assert ins.insn["before"][:10] == "0f1f440000"
        assert ins.insn["armed"][:2] == "e8"
        assert ins.insn["armed"][10:] == ins.insn["before"][10:]


def test_offset_probe_is_a_breakpoint_or_jump(kbridge_session: Session) -> None:
    arm64 = kbridge_session.arch.name == "arm64"
    offset = 8 if arm64 else 5  # arm64: past the ftrace site (+4); x86: after the 5-byte nop
    ins = inspect(kbridge_session, "ksys_write", offset)
    assert ins.probe_address == ins.address + offset
    assert ins.insn["before"] == ins.insn["after"]
    if arm64:
        assert ins.mode == "breakpoint" and ins.insn["armed"][:8] == "800020d4"
    else:
        # A non-ftrace x86 probe starts as int3 and is optimized into a 5-byte jump.
        assert ins.mode in ("optimized", "breakpoint")
        assert ins.insn["armed"][:2] == ("e9" if ins.mode == "optimized" else "cc")


def test_bad_offset_is_refused_and_nothing_stays(kbridge_session: Session) -> None:
    with pytest.raises(KbridgeError) as e:
        inspect(kbridge_session, "ksys_write", 1 if kbridge_session.arch.name == "x86_64" else 2)
    assert "EILSEQ" in e.value.message or "EINVAL" in e.value.message
    assert not any(m.startswith("kb_insp_") for m in kbridge_session.loaded_modules())
    assert find_list_line(kbridge_session.kprobes_list(), "ksys_write", 1) == ""


def test_blacklisted_symbol_is_reported(kbridge_session: Session) -> None:
    sym = "kprobe_int3_handler" if kbridge_session.arch.name == "x86_64" else "kprobe_breakpoint_handler"
    ins = inspect(kbridge_session, sym)
    assert ins.blacklisted and ins.mode == "blacklisted" and not ins.insn
