"""The bcc renderer: the same ProbeSpec as the module, as BPF C and an attach plan."""

from __future__ import annotations

import pytest

from kbridge.arch import ARM64, X86_64
from kbridge.errors import KbridgeError
from kbridge.mechanisms.bpf.render import render
from kbridge.spec import make_spec


def test_kprobe_args_by_position_x86() -> None:
    prog = render(make_spec("ksys_write", {"pre"}, ["fd=1", "count=3"], X86_64), X86_64)
    assert "args[0] = ctx->di;  /* fd */" in prog.text
    assert "args[1] = ctx->dx;  /* count */" in prog.text
    assert prog.attach == [{"type": "kprobe", "symbol": "ksys_write", "offset": 0, "fn": "kb_pre"}]


def test_arm64_args_and_syscall_wrapper() -> None:
    prog = render(make_spec("vfs_read", {"pre"}, ["count=3"], ARM64), ARM64)
    assert "args[0] = ctx->regs[2];" in prog.text
    sys = render(make_spec("__x64_sys_write", {"pre"}, ["fd=1", "x=4"], X86_64), X86_64)
    # The syscall ABI's 4th argument is r10 on x86_64, read through the user's pt_regs.
    assert "&uregs->di" in sys.text and "&uregs->r10" in sys.text


def test_kretprobe_plan_and_filters() -> None:
    prog = render(make_spec("vfs_read", {"ret"}, None, X86_64, maxactive=16, pid=42, comm="dd"), X86_64)
    assert [a["type"] for a in prog.attach] == ["kprobe", "kretprobe"]
    assert prog.attach[1]["maxactive"] == 16
    assert "if (tgid != 42)" in prog.text and 'const char want[] = "dd";' in prog.text
    assert "PT_REGS_RC(ctx)" in prog.text
    plan = prog.plan([7, 9], "/dev/virtio-ports/org.kbridge.bpf", "abcd")
    assert plan["exclude"] == [7, 9] and plan["handlers"] == ["ret"]


def test_post_handler_refused() -> None:
    with pytest.raises(KbridgeError, match="no post handler"):
        render(make_spec("ksys_write", {"post"}, None, X86_64), X86_64)


def test_user_text_is_validated_before_rendering() -> None:
    with pytest.raises(KbridgeError):
        make_spec("ksys_write; evil", {"pre"}, None, X86_64)
    with pytest.raises(KbridgeError):
        make_spec("ksys_write", {"pre"}, None, X86_64, comm='a"b')
