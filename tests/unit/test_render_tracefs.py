"""ProbeSpec -> kprobe_events lines, and reading the guest's answers back (no VM needed)."""

from __future__ import annotations

import pytest

from kbridge import kprobe_events
from kbridge.arch import ARM64, X86_64
from kbridge.errors import KbridgeError
from kbridge.kprobe_events import grammar_for
from kbridge.mechanisms.tracefs.guest import build_filter, map_position
from kbridge.mechanisms.tracefs.render import check_lines, removal_line, render, spec_notes
from kbridge.spec import make_spec


def test_pre_with_args_by_position() -> None:
    (ev,) = render(make_spec("ksys_write", {"pre"}, ["fd=1", "count=3"], X86_64), X86_64)
    assert ev.line == "p:kbridge/ksys_write_p ksys_write fd=$arg1:u64 count=$arg3:u64 kb_ip=%ip:x64 kb_flags=%flags:x64"
    assert ev.handlers == ("pre",) and ev.full_name == "kbridge/ksys_write_p"


def test_offset_and_clone_names() -> None:
    (ev,) = render(make_spec("foo.isra.0", {"pre"}, offset=4), X86_64)
    assert ev.line == "p:kbridge/foo_isra_0_p foo.isra.0+4 kb_ip=%ip:x64 kb_flags=%flags:x64"


@pytest.mark.parametrize("arch,fd,count", [(X86_64, "+112($arg1)", "+96($arg1)"), (ARM64, "+0($arg1)", "+16($arg1)")])
def test_syscall_wrapper_reads_through_pt_regs(arch, fd, count) -> None:  # type: ignore[no-untyped-def]
    sym = f"{arch.syscall_prefix}write"
    (ev,) = render(make_spec(sym, {"pre"}, ["fd=1", "count=3"], arch), arch)
    regs = "kb_ip=%ip:x64 kb_flags=%flags:x64" if arch is X86_64 else "kb_ip=%pc:x64 kb_flags=%pstate:x64"
    assert ev.line == f"p:kbridge/{sym}_p {sym} fd={fd}:u64 count={count}:u64 {regs}"


def test_x86_syscall_fourth_argument_is_r10() -> None:
    (ev,) = render(make_spec("__x64_sys_pread64", {"pre"}, ["pos=4"], X86_64), X86_64)
    assert "pos=+56($arg1):u64" in ev.line


def test_kretprobe_and_post_mapping() -> None:
    spec = make_spec("vfs_read", {"pre", "post", "entry", "ret"}, ["n=3"], X86_64, maxactive=20)
    p, r = render(spec, X86_64)
    assert p.handlers == ("pre", "post", "entry")
    assert r.line == "r20:kbridge/vfs_read_r vfs_read ret=$retval:s64" and r.handlers == ("ret",)
    assert any("post-handler" in n for n in spec_notes(spec))
    assert removal_line(r.event) == "-:kbridge/vfs_read_r"


def test_check_lines_rejects_removals_duplicates_and_bad_syntax() -> None:
    with pytest.raises(KbridgeError, match="removes an event"):
        check_lines(["-:kprobes/x"], grammar_for(None, X86_64))
    with pytest.raises(KbridgeError, match="already defined"):
        check_lines(["p:a ksys_write", "r:a vfs_read"], grammar_for(None, X86_64))
    with pytest.raises(kprobe_events.EventSyntaxError) as e:
        check_lines(["p:w ksys_write fd=%r10d"], grammar_for(None, X86_64))
    assert (e.value.error, e.value.position) == ("BAD_REG_NAME", 18)
    # %x0 is a register on arm64 only.
    assert check_lines(["p:w ksys_write fd=%x0"], grammar_for(None, ARM64))[0].args[0].fetch == kprobe_events.Reg("x0")


def test_filter_building() -> None:
    assert build_filter("fd == 1", [12], "dd", [3, 4]) == (
        '(fd == 1) && (common_pid == 12) && comm == "dd" && common_pid != 3 && common_pid != 4'
    )
    # A process: every thread it has (an event records the thread, 6.1 has no tgid field).
    assert build_filter(threads=[12, 14, 13]) == "(common_pid == 12 || common_pid == 13 || common_pid == 14)"
    assert build_filter() == ""
    with pytest.raises(KbridgeError, match="--comm"):
        build_filter(comm='a"b')
    with pytest.raises(KbridgeError, match="one line"):
        build_filter("fd == 1\nfd == 2")


def test_caret_maps_back_onto_the_users_spacing() -> None:
    # error_log re-joins the words with single spaces; the caret is in that text.
    line = "p:w   ksys_write    fd=%zz"
    assert map_position(line, len("p:w ksys_write fd=")) == line.index("%zz")
