"""kbridge.kprobe_events: the kprobe_events grammar and Linux 6.1's error verdicts.

Expected error classes and caret positions come from reading linux-6.1.119
(kernel/trace/trace_kprobe.c, trace_probe.c); the position is the column the
kernel's error_log caret points at in the single-space command.
"""

from __future__ import annotations

import pytest

from kbridge import kprobe_events
from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.kprobe_events import (
    ERRORS,
    Arg,
    Bitfield,
    Comm,
    Deref,
    ErrorLogEntry,
    EventSyntaxError,
    FetchArg,
    Imm,
    ImmStr,
    Mem,
    ProbeEvent,
    Reg,
    RemoveEvent,
    Retval,
    Stack,
    StackPtr,
    SymMem,
    default_event_name,
    format,  # noqa: A004 - the module's own name for it
    grammar_for,
    parse_error_log,
)
from kbridge.kprobe_events.grammar import ERROR_CLASSES, LATER_ERRORS


def parse(line: str, arch: str = "x86_64", kernel: str | None = None) -> kprobe_events.Event:
    """LINE read as KERNEL's (default 6.1) kprobe_events on ARCH reads it."""
    return kprobe_events.parse(line, grammar_for(kernel, get_arch(arch)))


GOOD = [
    # heads: names, groups, maxactive, %return
    "p vfs_read",
    "p:myprobe vfs_read",
    "p:mygrp/myprobe vfs_read",
    "p:mygrp/ vfs_read",
    "p:my-grp/ev vfs_read",  # 6.1.y: is_good_system_name() allows '-'
    "r vfs_read",
    "r:ret vfs_read $retval",
    "r16:ret vfs_read $retval",
    "r4096 vfs_read",
    "p vfs_read%return $retval",
    "p:grp/ev vfs_read%return",
    "p vfs_read+16",
    "p ext4:ext4_sync_fs",
    "r ext4:ext4_sync_fs $retval",
    "p 0xffffffff81000000",
    "p:addr 0xffffffff81000000 %ax",
    # every fetch kind
    "p vfs_read %ax %bx %cx %dx %si %di %bp %sp %r8 %r15 %ip %flags %cs %ss %orig_ax",
    "p vfs_read @0xffffffff82000000",
    "p vfs_read @jiffies @jiffies+8 @jiffies-8",
    "p vfs_read $stack $stack0 $stack2048",
    "p vfs_read $arg1 $arg2 $arg2048",
    "p vfs_read $comm",
    "p vfs_read \\1 \\16 \\-5",
    'p vfs_read \\"hello" s=\\"with=eq":string',
    "p vfs_read +8(%di) -8(%di) +u8(%si) -u8(%si) +16($stack)",
    "p vfs_read +0(+8(+16(%di))):u64 +u0(+8(%di)):ustring",
    "p vfs_read +0(@jiffies) +8(\\4096)",
    # types
    "p vfs_read a=%ax:u8 b=%ax:u16 c=%ax:u32 d=%ax:u64",
    "p vfs_read a=%ax:s8 b=%ax:s16 c=%ax:s32 d=%ax:s64",
    "p vfs_read a=%ax:x8 b=%ax:x16 c=%ax:x32 d=%ax:x64 e=%ip:symbol",
    "p vfs_read f=+0(%si):string g=+u0(%si):ustring h=+0(%si):ustring",
    'p vfs_read $comm:string \\"x":string @0x10:string \\16:string',
    "p vfs_read %ax:symstr $stack1:symstr $arg1:symstr +0(%di):symstr",
    "r vfs_read $retval:symstr",
    "p vfs_read %ax:b4@0/8 %ax:b1@63/64 +0(%di):b3@5/32",
    "p vfs_read +0(%di):u32[4] +0(%di):string[2] +0(%di):s8[64] +0(%di):b2@1/8[3]",
    "p vfs_read +u0(%di):ustring[2]",
    # 15-slot fetch program exactly full: @SYM (3 slots) + 11 derefs + array
    "p vfs_read " + "+0(" * 11 + "@a" + ")" * 11 + ":u32[2]",
    # 14 nested derefs of a register: the deepest 6.1 allows
    "p vfs_read " + "+0(" * 14 + "%ax" + ")" * 14,
    # removals (6.1 also takes the probe point and args as a filter)
    "-:myprobe",
    "-:mygrp/myprobe",
    "-:mygrp/",
    "-:myprobe vfs_read+8 arg1=%ax",
]


@pytest.mark.parametrize("line", GOOD)
def test_round_trip(line):
    event = parse(line)
    text = format(event)
    assert parse(text) == event
    assert format(parse(text)) == text
    assert text == line  # these are written in canonical form already


ARM64_GOOD = [
    "p vfs_read %x0 %x30 %lr %sp %pc %pstate",
    "p vfs_read +8(%x1):u32 $arg8",
    "r vfs_read $retval",
]


@pytest.mark.parametrize("line", ARM64_GOOD)
def test_round_trip_arm64(line):
    assert format(parse(line, arch="arm64")) == line


def test_whitespace_is_normalised():
    assert format(parse("  p:grp/ev   vfs_read\t\t%ax  ")) == "p:grp/ev vfs_read %ax"


@pytest.mark.parametrize(
    ("line", "canonical"),
    [
        ("p:grp.ev vfs_read", "p:grp/ev vfs_read"),  # '.' separates GRP.EVENT in 6.1.y
        ("p vfs_read+0", "p vfs_read"),
        ("p vfs_read+0x10", "p vfs_read+16"),
        ("r0x10 vfs_read", "r16 vfs_read"),  # kstrtouint(base 0)
        ("pfoo vfs_read", "p vfs_read"),  # 6.1 ignores junk before ':'
        ("p vfs_read $arg+1", "p vfs_read $arg1"),  # kstrtoul() takes a '+'
        ("p vfs_read @0X10 \\+7 \\0x10", "p vfs_read @0x10 \\7 \\16"),
        ("p vfs_read $COMM +0x10($stack)", "p vfs_read $comm +16($stack)"),
        ("p:grp/ev vfs_read+0%return", "p:grp/ev vfs_read%return"),
        ("p vfs_read +8(%ax)junk", "p vfs_read +8(%ax)"),  # text after last ')' dropped
        ("p vfs_read +0x8(%ax):u8[0x4]", "p vfs_read +8(%ax):u8[4]"),
        ("p vfs_read %ax:b0x4@0x2/0x20", "p vfs_read %ax:b4@2/32"),
        ("r vfs_read%return", "p vfs_read%return"),
        ('p vfs_read \\"', 'p vfs_read \\""'),  # str[len - 1] is the opening quote
        ("p vfs_read # a comment", "p vfs_read"),
        ("p vfs_read $comm # comment", "p vfs_read $comm"),
    ],
)
def test_equivalent_spellings(line, canonical):
    assert format(parse(line)) == canonical
    assert parse(canonical) == parse(line)


def test_model_fields():
    ev = parse("r8:grp/ev ext4:ext4_sync_fs+0 r=$retval:s32 x=+8(-16(%di)):b3@2/16[4] u=+u0(%si):ustring")
    assert ev == ProbeEvent(
        kind="r",
        maxactive=8,
        group="grp",
        event="ev",
        symbol="ext4_sync_fs",
        module="ext4",
        offset=0,
        args=(
            FetchArg(Retval(), name="r", type="s32"),
            FetchArg(Deref(8, Deref(-16, Reg("di"))), name="x", type=Bitfield(3, 2, 16), array=4),
            FetchArg(Deref(0, Reg("si"), user=True), name="u", type="ustring"),
        ),
    )
    assert ev.is_return and ev.effective_group == "grp"
    ev = parse('p vfs_read%return @sym-8 $stack3 $stack $comm \\5 \\"s" @0x10')
    assert ev.kind == "r" and ev.return_suffix and ev.group is None and ev.event is None
    assert [a.fetch for a in ev.args] == [SymMem("sym", -8), Stack(3), StackPtr(), Comm(), Imm(5), ImmStr("s"), Mem(16)]
    assert parse("p vfs_read $arg3").args[0].fetch == Arg(3)
    assert parse("p 0x1000").address == 0x1000
    assert parse("-:g/e vfs_read") == RemoveEvent("g", "e", ("vfs_read",))
    assert parse("-:g/") == RemoveEvent("g", None)


def test_extra_args_are_dropped_like_6_1():
    line = "p vfs_read " + " ".join(f"a{i}=%ax" for i in range(130))
    assert len(parse(line).args) == 128


@pytest.mark.parametrize(
    ("event", "name"),
    [
        ("p vfs_read", "p_vfs_read_0"),
        ("p vfs_read+8", "p_vfs_read_8"),
        ("r vfs_read", "r_vfs_read_0"),
        ("p vfs_read%return", "r_vfs_read_0"),
        ("p ext4:ext4_sync_fs", "p_ext4_ext4_sync_fs_0"),
        ("p foo.isra.0+4", "p_foo_isra_0_4"),
        ("p 0xffffffff81000000", "p_0xffffffff81000000"),
        ("p " + "s" * 70, "p_" + "s" * 61),  # snprintf to MAX_EVENT_NAME_LEN
    ],
)
def test_default_event_name(event, name):
    ev = parse(event)
    assert default_event_name(ev) == name
    assert ev.effective_event == name and ev.effective_group == "kprobes"


# (line, error class, caret column in the single-space command)
BAD = [
    # -- head: maxactive.  No log index set yet: index 0, offset 1.
    ("p5 vfs_read", "MAXACT_NO_KPROBE", 1),
    ("r0 vfs_read", "BAD_MAXACT", 1),  # docs say 0 = default; 6.1: `if (ret || !maxactive)`
    ("r1x:ev vfs_read", "BAD_MAXACT", 1),
    ("r4097 vfs_read", "MAXACT_TOO_BIG", 1),
    # -- probe point: trace_probe_log_set_index(1)
    ("p vfs_read%foo", "BAD_ADDR_SUFFIX", 10),  # trace_probe_log_err(tmp - symbol, ...)
    ("p vfs_read%returns", "BAD_ADDR_SUFFIX", 10),
    ("p vfs_read-8", "BAD_PROBE_ADDR", 2),  # offset < 0
    ("p vfs_read+zz", "BAD_PROBE_ADDR", 2),
    ("p vfs_read+0x100000000", "BAD_PROBE_ADDR", 2),  # offset > UINT_MAX
    ("p 1foo", "BAD_PROBE_ADDR", 2),  # no such symbol can exist
    ("p %return", "BAD_PROBE_ADDR", 2),
    ("r vfs_read+8", "BAD_RETPROBE", 2),  # kprobe_on_func_entry() == -EINVAL
    ("p vfs_read+8%return", "BAD_RETPROBE", 2),
    # -- event name: index 0, offset = after ':'
    ("p:/ev vfs_read", "NO_GROUP_NAME", 2),
    ("p:.ev vfs_read", "NO_GROUP_NAME", 2),
    ("p:1grp/ev vfs_read", "BAD_GROUP_NAME", 2),
    ("p:" + "g" * 64 + "/ev vfs_read", "GROUP_TOO_LONG", 2),
    ("p: vfs_read", "NO_EVENT_NAME", 2),
    ("p:grp/1ev vfs_read", "BAD_EVENT_NAME", 6),  # offset += slash - event + 1
    ("p:grp/my-ev vfs_read", "BAD_EVENT_NAME", 6),
    ("p:a/b/c vfs_read", "BAD_EVENT_NAME", 4),
    ("p:" + "e" * 64 + " vfs_read", "EVENT_TOO_LONG", 2),
    ("r2:grp/1ev vfs_read%x", "BAD_ADDR_SUFFIX", 19),  # probe point is checked first
    # -- arguments: index i + 2; "p vfs_read " puts argv[2] at column 11
    ("p:foo vfs_read $retval", "RETVAL_ON_PROBE", 15),
    ("r 0xffffffff81000000 $retval", "RETVAL_ON_PROBE", 21),  # no TPARG_FL_RETURN for ADDR
    ("p vfs_read %zz", "BAD_REG_NAME", 11),
    ("p vfs_read %x0", "BAD_REG_NAME", 11),
    ("p vfs_read %eax", "BAD_REG_NAME", 11),
    ("p vfs_read $stack2049", "BAD_STACK_NUM", 11),  # > THREAD_SIZE / sizeof(long)
    ("p vfs_read $stack-1", "BAD_VAR", 11),
    ("p vfs_read $stack1x", "BAD_VAR", 11),
    ("p vfs_read $arg0", "BAD_ARG_NUM", 11),
    ("p vfs_read $arg2049", "BAD_ARG_NUM", 11),
    ("p vfs_read $arg", "BAD_VAR", 11),
    ("p vfs_read $foo", "BAD_VAR", 11),
    ("r vfs_read $arg1", "BAD_VAR", 11),  # flags must be exactly KERNEL|FENTRY
    ("p vfs_read%return $arg1", "BAD_VAR", 18),
    ("p vfs_read+8 $arg1", "BAD_VAR", 13),  # not on function entry
    ("p 0xffffffff81000000 $arg1", "BAD_VAR", 21),
    ("p vfs_read @1zz", "BAD_MEM_ADDR", 11),
    ("p vfs_read @+0x10", "FILE_ON_KPROBE", 11),
    ("p vfs_read \\xyz", "BAD_IMM", 12),  # trace_probe_log_err(offs + 1, BAD_IMM)
    ("p vfs_read \\", "BAD_IMM", 12),
    ('p vfs_read \\"abc', "IMMSTR_NO_CLOSE", 16),  # offs + 2 + strlen("abc")
    ("p vfs_read foo", "BAD_FETCH_ARG", 11),
    ("p vfs_read +8%ax", "DEREF_NEED_BRACE", 11),
    ("p vfs_read +zz(%ax)", "BAD_DEREF_OFFS", 11),
    ("p vfs_read +(%ax)", "BAD_DEREF_OFFS", 11),
    # offs += (tmp + 1 - arg) + (arg[0] != '-' ? 1 : 0): points at the inner arg
    ("p vfs_read +8(%ax", "DEREF_OPEN_BRACE", 17),  # offs + strlen(arg)
    ("p vfs_read +8(%zz)", "BAD_REG_NAME", 14),
    ("p vfs_read -8(%zz)", "BAD_REG_NAME", 14),
    ("p vfs_read +0x10(%zz)", "BAD_REG_NAME", 17),
    # ...which is one column short for user derefs: the kernel drops the 'u'
    # (arg[1] = arg[0]; arg++) before measuring, so the caret sits on '('.
    ("p vfs_read +u8(%zz)", "BAD_REG_NAME", 14),
    ("p vfs_read -u8(%zz)", "BAD_REG_NAME", 14),
    ("p vfs_read +8()", "BAD_FETCH_ARG", 14),
    ("p vfs_read +8($comm)", "COMM_CANT_DEREF", 14),
    ('p vfs_read +8(\\"s")', "COMM_CANT_DEREF", 14),
    ("p vfs_read +8(+0($foo))", "BAD_VAR", 17),
    # fetch programs longer than FETCH_INSN_MAX - 1 slots
    ("p vfs_read " + "+0(" * 15 + "%ax" + ")" * 15, "TOO_MANY_OPS", 14),
    ("p vfs_read " + "+0(" * 13 + "@a" + ")" * 13, "TOO_MANY_OPS", 14),
    ("p vfs_read " + "+0(" * 12 + "@a" + ")" * 12 + ":u32[2]", "TOO_MANY_OPS", 11),
    ("p vfs_read " + "+0(" * 12 + "@a" + ")" * 12 + ":string[2]", "TOO_MANY_OPS", 11),
    ("p vfs_read " + "+0(" * 12 + "@a" + ")" * 12 + ":b1@0/8", "BAD_BITFIELD", 11 + 51),
    # types and arrays: positions relative to the type ("t - arg")
    ("p vfs_read %ax:u32[", "ARRAY_NO_CLOSE", 19),  # t2 + strlen(t2)
    ("p vfs_read +0(%ax):u32[4]x", "BAD_ARRAY_SUFFIX", 25),
    ("p vfs_read +0(%ax):u32[0]", "BAD_ARRAY_NUM", 23),
    ("p vfs_read +0(%ax):u32[x]", "BAD_ARRAY_NUM", 23),
    ("p vfs_read +0(%ax):u32[65]", "ARRAY_TOO_BIG", 23),
    ("p vfs_read %ax:u33", "BAD_TYPE", 15),
    ("p vfs_read %ax:", "BAD_TYPE", 15),
    ("p vfs_read %ax:char", "BAD_TYPE", 15),  # char type arrived after 6.1
    ("p vfs_read %ax:b4@0/7", "BAD_TYPE", 15),
    ("p vfs_read %zz:u33", "BAD_TYPE", 15),  # the type is checked before the fetch
    ("p vfs_read %ax:string", "BAD_STRING", 15),
    ("p vfs_read $stack:ustring", "BAD_STRING", 18),
    ("p vfs_read %ax:u32[2]", "BAD_STRING", 15),  # arrays need memory
    ("p vfs_read +u0(%ax):u32[2]", "BAD_STRING", 20),  # ...kernel memory (ST_MEM)
    ("p vfs_read %ax:symstr[2]", "BAD_STRING", 15),
    ("p vfs_read $stack:symstr", "BAD_SYMSTRING", 18),
    ("p vfs_read +u0(%ax):symstr", "BAD_SYMSTRING", 20),
    ("p vfs_read \\1:symstr", "BAD_SYMSTRING", 14),
    ("p vfs_read %ax:b0@0/8", "BAD_BITFIELD", 15),
    ("p vfs_read %ax:b4@6/8", "BAD_BITFIELD", 15),
    ("p vfs_read %ax:b4/8", "BAD_BITFIELD", 15),
    ("p vfs_read %ax:b4@/8", "BAD_BITFIELD", 15),
    ("p vfs_read %zz:b4@6/8", "BAD_REG_NAME", 11),  # bitfield is checked after the fetch
    # names: trace_probe_log_err(0, ...) at the start of the argument
    ("p vfs_read " + "n" * 33 + "=%ax", "ARG_NAME_TOO_LONG", 11),
    ("p vfs_read =%ax", "NO_ARG_NAME", 11),
    ("p vfs_read 1a=%ax", "BAD_ARG_NAME", 11),
    ('p vfs_read \\"a=b"', "BAD_ARG_NAME", 11),  # '=' splits before quotes matter
    ("p vfs_read a=%ax a=%bx", "USED_ARG_NAME", 17),
    ("p vfs_read arg2=%ax %bx", "USED_ARG_NAME", 20),  # "arg2" is %bx's default name
    ("p vfs_read common_pid=%ax", "USED_ARG_NAME", 11),
    ("p vfs_read __probe_ip=%ax", "USED_ARG_NAME", 11),
    ("p vfs_read x=", "NO_ARG_BODY", 13),
    ("p vfs_read x=" + "+0(" * 15 + "%ax" + ")" * 15 + "x", "ARG_TOO_LONG", 13),
    # registration: traceprobe_update_arg(), then log index 1, offset 0
    ("p vfs_read @sym+zz", "FAIL_REG_PROBE", 2),
    ("p vfs_read @", "BAD_PROBE_ADDR", 2),
    ("p vfs_read @-8", "BAD_PROBE_ADDR", 2),
]


@pytest.mark.parametrize(("line", "error", "position"), BAD)
def test_bad_lines(line, error, position):
    with pytest.raises(EventSyntaxError) as info:
        parse(line)
    err = info.value
    assert (err.error, err.kernel_position) == (error, position)
    assert err.position == position  # single spaces: same column in the line
    assert err.message == ERRORS[error]
    assert err.command == line
    assert isinstance(err, KbridgeError)


@pytest.mark.parametrize(
    ("line", "error", "position"),
    [
        ("p vfs_read %ax", "BAD_REG_NAME", 11),
        ("p vfs_read %x31", "BAD_REG_NAME", 11),
        ("p vfs_read %r0", "BAD_REG_NAME", 11),
        ("r vfs_read+4", "BAD_RETPROBE", 2),  # no ENDBR allowance on arm64
    ],
)
def test_bad_lines_arm64(line, error, position):
    with pytest.raises(EventSyntaxError) as info:
        parse(line, arch="arm64")
    assert (info.value.error, info.value.position) == (error, position)


def test_x86_endbr_offset_is_the_entry_only_with_ibt():
    # x86 treats +4 as the entry when the kernel has IBT (endbr64 first): trixie's 6.12 on.
    assert parse("r vfs_read+4 $retval", kernel="6.12").offset == 4
    assert parse("p vfs_read+4 $arg1", kernel="6.12").args[0].fetch == Arg(1)
    # bookworm's 6.1 has no IBT: +4 is no function entry (the kernel's BAD_RETPROBE).
    with pytest.raises(EventSyntaxError) as info:
        parse("r vfs_read+4 $retval")
    assert info.value.error == "BAD_RETPROBE"


@pytest.mark.parametrize(
    ("line", "kpos", "position"),
    [
        # The kernel re-joins argv with single spaces; we map its column back.
        ("p:foo   vfs_read\t\t$retval", 15, 18),
        ("  p5 vfs_read", 1, 3),
        ("p  vfs_read   +8(%zz)  ", 14, 17),
        ("p vfs_read\t%ax:u32[", 19, 19),
        ("p vfs_read  %zz  # comment", 11, 12),
    ],
)
def test_positions_map_back_onto_the_original_line(line, kpos, position):
    with pytest.raises(EventSyntaxError) as info:
        parse(line)
    assert (info.value.kernel_position, info.value.position) == (kpos, position)
    assert " " * 2 not in info.value.command


def test_caret():
    with pytest.raises(EventSyntaxError) as info:
        parse("p:foo  vfs_read $retval")
    assert info.value.caret() == "p:foo  vfs_read $retval\n                ^"
    with pytest.raises(EventSyntaxError) as info:
        parse("p\tvfs_read\t%zz")
    assert info.value.caret() == "p\tvfs_read\t%zz\n \t        \t^"


@pytest.mark.parametrize(
    "line",
    [
        "",  # the kernel ignores empty lines
        "# only a comment",
        "x vfs_read",  # not p/r: -ECANCELED, then -EINVAL
        " -:foo",  # the '-' test looks at the raw first byte
        "p",  # argc < 2
        "r5:ev",
        "p /bin/sh:0x10",  # looks like a uprobe
        "p vfs_read $comm:u32",  # 6.1 returns -EINVAL without logging
        "p vfs_read $comm:string[2]",
        'p vfs_read \\"a":u8',
        "-",
        "-foo",
        "-:",
    ],
)
def test_rejected_without_error_log(line):
    with pytest.raises(EventSyntaxError) as info:
        parse(line)
    assert info.value.error is None and info.value.position is None
    assert info.value.log_entry() is None


def test_unknown_arch():
    with pytest.raises(KbridgeError):
        parse("p vfs_read", arch="riscv")


# What 6.1 prints: tracing_err_log_seq_show() in kernel/trace/trace.c.
ERROR_LOG = (
    "[  123.456789] trace_kprobe: error: $retval is not available on probe\n"
    "  Command: p:foo vfs_read $retval\n"
    "                          ^\n"
    "[ 4242.000001] hist:sched:sched_switch: error: Couldn't find field\n"
    "  Command: keys=foo\n"
    "                ^\n"
    "[123456.100000] trace_kprobe: error: Invalid $-valiable specified\n"
    "  Command: r vfs_read $arg1\n"
    "                      ^\n"
)


def test_parse_error_log():
    entries = parse_error_log(ERROR_LOG)
    assert [(e.subsystem, e.error, e.command, e.position, e.error_class) for e in entries] == [
        ("trace_kprobe", "$retval is not available on probe", "p:foo vfs_read $retval", 15, "RETVAL_ON_PROBE"),
        ("hist:sched:sched_switch", "Couldn't find field", "keys=foo", 5, None),
        ("trace_kprobe", "Invalid $-valiable specified", "r vfs_read $arg1", 11, "BAD_VAR"),
    ]
    assert entries[0].timestamp == pytest.approx(123.456789)
    assert "".join(map(str, entries)) == ERROR_LOG
    assert parse_error_log("") == []


@pytest.mark.parametrize(("line", "error", "position"), BAD[:40:3])
def test_predicted_log_entry_matches_the_kernel_format(line, error, position):
    with pytest.raises(EventSyntaxError) as info:
        parse(line)
    entry = info.value.log_entry(timestamp=7.5)
    assert parse_error_log(str(entry)) == [entry]
    assert entry == ErrorLogEntry(7.5, "trace_kprobe", ERRORS[error], line, position)


def test_error_table():
    names = list(ERRORS)
    assert names[0] == "FILE_NOT_FOUND" and names[-1] == "NO_EP_FILTER"
    assert len(names) == 60
    assert len(ERROR_CLASSES) == len(ERRORS) + len(LATER_ERRORS)  # messages are unique
    assert ERROR_CLASSES["Invalid probed address or symbol"] == "BAD_PROBE_ADDR"
