"""The trace_pipe parser, on lines captured from the real 6.1 guests (x86_64 and arm64)."""

from __future__ import annotations

import pytest

from kbridge import kprobe_events
from kbridge.arch import get_arch
from kbridge.mechanisms.tracefs.collect import (
    CpuStats,
    EventInfo,
    TracePipeParser,
    parse_cpu_stats,
    parse_kprobe_profile,
)


def parser_for(*lines: str, arch: str = "x86_64") -> TracePipeParser:
    infos = {}
    for line in lines:
        ev = kprobe_events.parse(line, kprobe_events.grammar_for(None, get_arch(arch)))
        infos[ev.effective_event] = EventInfo.from_probe(ev)
    return TracePipeParser(infos)


def feed_all(p: TracePipeParser, text: str) -> list:
    out = []
    for line in text.split("\n"):
        rec = p.feed(line)
        if rec is not None:
            out.append(rec)
    return out


# Captured on 6.1.0-56-amd64 (TCG) from /sys/kernel/tracing/trace_pipe after
# `echo 'hi there "x" y=1' > /tmp/x; echo hello`: strings are printed raw, so
# the newline they end with continues the line.
X86_CAPTURE = """\
              sh-125     [000] .....   115.478313: sw: (__x64_sys_write+0x0/0x20) fd=1 buf="hi there "x" y=1
" count=17 arr={0xd0,0x7e,0x36}
              sh-125     [000] .N...   115.478631: myw: (ksys_write+0x0/0xf0) fd=1 buf="hi there "x" y=1
" count=17 c="sh"
              sh-125     [000] .....   115.478912: myr: (do_syscall_64+0x5d/0xb0 <- ksys_write) ret=17
              sh-125     [000] .....   115.481377: sw: (__x64_sys_write+0x0/0x20) fd=1 buf="hello
" count=6 arr={0xd0,0x7e,0x36}
         qemu-ga-110     [000] .....   115.529394: tracing_mark_write: kbridge-end-1234"""

X86_LINES = (
    "p:kbt/myw ksys_write fd=$arg1:u64 buf=+0($arg2):ustring count=$arg3:u64 c=$comm",
    "p:kbt/sw __x64_sys_write fd=+112($arg1):u64 buf=+0(+104($arg1)):ustring count=+96($arg1):s64 arr=+0($arg1):x8[3]",
    "r:kbt/myr ksys_write ret=$retval:s64",
)

# The same on 6.1.0-56-arm64: other flags ("d...."), other offsets and ret sites.
ARM64_CAPTURE = """\
              sh-107     [000] d....    33.882880: sw: (__arm64_sys_write+0x0/0x30) fd=1 buf="hi there "x" y=1
" count=17 arr={0x1,0x0,0x0}
              sh-107     [000] .....    33.884337: myr: (__arm64_sys_write+0x24/0x30 <- ksys_write) ret=17"""

ARM64_LINES = (
    "p:kbt/sw __arm64_sys_write fd=+0($arg1):u64 buf=+0(+8($arg1)):ustring count=+16($arg1):s64 arr=+0($arg1):x8[3]",
    "r:kbt/myr ksys_write ret=$retval:s64",
)


def test_x86_capture_typed_args_and_multiline_strings() -> None:
    p = parser_for(*X86_LINES)
    recs = feed_all(p, X86_CAPTURE)
    assert [r.event for r in recs] == ["sw", "myw", "myr", "sw"]
    sw, myw, myr, sw2 = recs
    assert sw.args == {"fd": 1, "buf": 'hi there "x" y=1\n', "count": 17, "arr": [0xD0, 0x7E, 0x36]}
    assert (sw.comm, sw.pid, sw.cpu, sw.flags, sw.timestamp) == ("sh", 125, 0, ".....", 115.478313)
    assert myw.args == {"fd": 1, "buf": 'hi there "x" y=1\n', "count": 17, "c": "sh"}
    assert myr.site == "do_syscall_64+0x5d/0xb0 <- ksys_write" and myr.args == {"ret": 17}
    assert sw2.args["buf"] == "hello\n"
    assert p.markers == ["kbridge-end-1234"] and not p.unparsed


def test_arm64_capture() -> None:
    p = parser_for(*ARM64_LINES, arch="arm64")
    sw, myr = feed_all(p, ARM64_CAPTURE)
    assert sw.args == {"fd": 1, "buf": 'hi there "x" y=1\n', "count": 17, "arr": [1, 0, 0]}
    assert sw.flags == "d...."
    hit = p.hit(myr)
    assert (hit.mechanism, hit.handler, hit.symbol, hit.retval, hit.event) == (
        "tracefs",
        "ret",
        "ksys_write",
        17,
        "kbt/myr",
    )
    assert hit.to_json()["args"] == {"ret": 17}


def test_hit_for_kprobe_event() -> None:
    p = parser_for(X86_LINES[0])
    (rec,) = feed_all(
        p, '              sh-9     [000] .....   1.000001: myw: (ksys_write+0x0/0xf0) fd=2 buf="a b=c" count=5 c="sh"'
    )
    hit = p.hit(rec)
    assert hit.handler == "pre" and hit.retval is None
    assert hit.args == {"fd": 2, "buf": "a b=c", "count": 5, "c": "sh"}
    assert hit.to_json()["event"] == "kbt/myw"


def test_default_types_names_and_faults() -> None:
    # No NAME= gives argN; no type gives x64 (hex on the pipe); a failed read prints (fault).
    p = parser_for("p:g/e ksys_write $arg1 s=+0($arg2):string neg=$arg3:s32")
    (rec,) = feed_all(p, "   dd-1 [000] ..... 2.5: e: (ksys_write+0x0/0xf0) arg1=0x1 s=(fault) neg=-22")
    assert rec.args == {"arg1": 1, "s": None, "neg": -22}


def test_comm_with_dash_and_spaces() -> None:
    p = parser_for("p:g/e ksys_write")
    (rec,) = feed_all(p, " kworker/u2:1-my thing-42    [000] d.h1. 7.000000: e: (ksys_write+0x0/0xf0)")
    assert (rec.comm, rec.pid) == ("kworker/u2:1-my thing", 42)


def test_lost_other_and_unparsed_lines() -> None:
    p = parser_for("p:g/e ksys_write fd=$arg1:u64")
    feed_all(
        p,
        "CPU:0 [LOST 123 EVENTS]\nCPU:1 [LOST 7 EVENTS]\n"
        "  sh-1 [000] ..... 1.0: other_event: (vfs_read+0x0/0x10) x=1\n"
        "  sh-1 [000] ..... 1.0: e: (ksys_write+0x0/0xf0) fd=notanumber",
    )
    assert p.lost == 130
    assert p.other == 1
    assert len(p.unparsed) == 1


def test_open_string_at_end_of_stream_is_unparsed() -> None:
    p = parser_for("p:g/e ksys_write s=+0($arg2):ustring")
    assert p.feed('  sh-1 [000] ..... 1.0: e: (ksys_write+0x0/0xf0) s="no end') is None
    p.flush()
    assert len(p.unparsed) == 1


@pytest.mark.parametrize(
    "type_,text,value",
    [
        ("u8", "255", 255),
        ("s64", "-1", -1),
        ("x32", "0xdeadbeef", 0xDEADBEEF),
        ("symbol", "ksys_write+0x0/0xf0", "ksys_write+0x0/0xf0"),
        ("b4@0/8", "3", 3),
    ],
)
def test_types(type_: str, text: str, value: object) -> None:
    p = parser_for(f"p:g/e ksys_write v=$arg1:{type_}")
    (rec,) = feed_all(p, f"  sh-1 [000] ..... 1.0: e: (ksys_write+0x0/0xf0) v={text}")
    assert rec.args == {"v": value}


# per_cpu/cpu0/stats and kprobe_profile as the 6.1 guest prints them.
STATS = """entries: 12
overrun: 3043
commit overrun: 0
bytes: 4020
oldest event ts:   104.356779
now ts:   105.120223
dropped events: 0
read events: 1957
"""


def test_cpu_stats() -> None:
    s = parse_cpu_stats(STATS)
    assert s == CpuStats(entries=12, overrun=3043, commit_overrun=0, dropped=0, read=1957)
    assert (s - CpuStats(overrun=43)).lost == 3000


def test_kprobe_profile() -> None:
    text = (
        "  myw                                                       61               0\n"
        "  myr                                                       61               2\n"
    )
    assert parse_kprobe_profile(text) == {"myw": (61, 0), "myr": (61, 2)}
