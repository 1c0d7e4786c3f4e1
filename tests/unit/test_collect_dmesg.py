"""Parsing what the module prints (lines captured from a bookworm guest)."""

from kbridge.mechanisms.kmod.collect import parse_event, parse_hit, parse_stats
from kbridge.targets.base import parse_kmsg

MOD = "kb_ksys_write_2e25d275"


def test_kmsg_record():
    rec = parse_kmsg("6,1234,4641796,-;kb_ksys_write_2e25d275: hit=pre pid=109 tid=109 cpu=0 fd=1 count=6 comm=sh")
    assert rec and rec.seq == 1234 and rec.usec == 4641796 and rec.level == 6
    assert parse_kmsg(" SUBSYSTEM=virtio") is None
    assert parse_kmsg("4,9,10,-;tab\\x09here").text == "tab\there"


def test_hit_lines():
    h = parse_hit(f"{MOD}: hit=pre pid=109 tid=110 cpu=1 fd=1 count=6 comm=sh", MOD, "ksys_write", 4641796)
    assert (h.handler, h.pid, h.cpu, h.comm, h.args, h.retval) == ("pre", 109, 1, "sh", {"fd": 1, "count": 6}, None)
    assert h.timestamp == 4.641796
    r = parse_hit(f"{MOD}: hit=ret pid=5 tid=5 cpu=0 ret=-14 comm=my prog", MOD, "vfs_read")
    assert r.retval == -14 and r.comm == "my prog" and r.args == {}
    assert parse_hit("kb_other_1: hit=pre pid=1 tid=1 cpu=0 comm=x", MOD, "s") is None


def test_lifecycle_events():
    assert parse_event(f"{MOD}: ready run=ab12", MOD).kind == "ready"
    f = parse_event(f"{MOD}: register_kprobe failed: -84 run=ab12", MOD)
    assert (f.kind, f.errno, f.what) == ("failed", 84, "kprobe")
    u = parse_event(
        "kb_ksys_write_acbe64d6: unloaded run=41649974 pre=1 post=1 entry=0 ret=0 fault=0 "
        "kprobe_nmissed=0 kretprobe_nmissed=0",
        "kb_ksys_write_acbe64d6",
    )
    assert u.counters == {
        "pre": 1,
        "post": 1,
        "entry": 0,
        "ret": 0,
        "fault": 0,
        "kprobe_nmissed": 0,
        "kretprobe_nmissed": 0,
    }
    assert parse_stats("pre 3\npost 3\nkprobe_nmissed 0\n") == {"pre": 3, "post": 3, "kprobe_nmissed": 0}


# Captured from a bookworm x86_64 guest (6.1.0-56-amd64): ksys_write+0x5 with --pre --post,
# then ksys_write with --entry --ret.
X86_PRE = (
    "kb_ksys_write_acbe64d6: hit=pre pid=152 tid=152 cpu=0 addr=0xffffffff81367685 "
    "ip=0xffffffff81367686 flags=0x202 comm=sh"
)
X86_POST = (
    "kb_ksys_write_acbe64d6: hit=post pid=152 tid=152 cpu=0 addr=0xffffffff81367685 "
    "ip=0xffffffff81367687 flags=0x202 comm=sh"
)
X86_RET = "kb_ksys_write_c6b3ee17: hit=ret pid=160 tid=160 cpu=0 took=343996ns ret=3 comm=sh"
X86_DURATIONS = "kb_ksys_write_c6b3ee17: durations run=4c79da78 log2_ns=19:1,23:1"


def test_hit_registers_show_the_single_step():
    pre = parse_hit(X86_PRE, "kb_ksys_write_acbe64d6", "ksys_write", arch="x86_64")
    post = parse_hit(X86_POST, "kb_ksys_write_acbe64d6", "ksys_write", arch="x86_64")
    assert (pre.addr, pre.ip, pre.flags) == (0xFFFFFFFF81367685, 0xFFFFFFFF81367686, 0x202)
    assert (pre.tid, pre.arch) == (152, "x86_64")
    assert post.ip - post.addr == 2  # the 2-byte instruction at +5 was single-stepped
    assert pre.args == {} and post.args == {}
    assert pre.to_json()["ip"] == "0xffffffff81367686" and pre.to_json()["flags"] == "0x202"


def test_arm64_registers_are_pc_and_pstate():
    # Captured from a bookworm arm64 guest (6.1.0-56-arm64): ksys_write+0 with --pre --post.
    mod = "kb_ksys_write_0bb91dfe"
    pre = parse_hit(
        f"{mod}: hit=pre pid=139 tid=139 cpu=0 addr=0xffffa21f135ac154 pc=0xffffa21f135ac154 "
        "pstate=0x80000005 fd=1 comm=sh",
        mod,
        "ksys_write",
        arch="arm64",
    )
    h = parse_hit(
        f"{mod}: hit=post pid=139 tid=139 cpu=0 addr=0xffffa21f135ac154 pc=0xffffa21f135ac158 "
        "pstate=0x80000005 fd=1 comm=sh",
        mod,
        "ksys_write",
        arch="arm64",
    )
    assert pre.ip == pre.addr  # BRK: the pre-handler sees pc at the probe address
    assert (h.arch, h.ip - h.addr, h.flags, h.args) == ("arm64", 4, 0x80000005, {"fd": 1})
    j = h.to_json()
    assert j["pc"] == "0xffffa21f135ac158" and j["pstate"] == "0x80000005" and "ip" not in j


def test_args_named_like_fixed_fields_stay_args():
    # --arg addr=1 / --arg took=2 print NAME=DECIMAL: never hex registers, never a duration.
    h = parse_hit("kb_m_1: hit=pre pid=7 tid=7 cpu=0 addr=0x10 ip=0x11 flags=0x2 addr=5 took=9 comm=sh", "kb_m_1", "f")
    assert h.addr == 0x10 and h.args == {"addr": 5, "took": 9} and h.duration_ns is None


def test_return_duration_and_histogram_line():
    r = parse_hit(X86_RET, "kb_ksys_write_c6b3ee17", "ksys_write")
    assert (r.retval, r.duration_ns, r.args) == (3, 343996, {})
    ev = parse_event(X86_DURATIONS, "kb_ksys_write_c6b3ee17")
    assert ev.kind == "durations" and ev.run == "4c79da78" and ev.buckets == {19: 1, 23: 1}
    assert parse_event("kb_m_1: durations run=ab log2_ns=-", "kb_m_1").buckets == {}


def test_fault_hits_carry_the_trap_number():
    f = parse_hit(
        "kb_m_1: hit=fault pid=9 tid=9 cpu=0 addr=0xffffffff81367680 ip=0xffffffff8141d2b0 "
        "flags=0x10046 trap=14 comm=dd",
        "kb_m_1",
        "ksys_write",
    )
    assert (f.handler, f.trap, f.args) == ("fault", 14, {})
    assert f.to_json()["trap"] == 14


def test_stats_durations():
    from kbridge.mechanisms.kmod.collect import parse_stats_durations

    text = "pre 0\npost 0\nentry 2\nret 2\nfault 0\ndurations_log2_ns 19:1,23:1\nkretprobe_nmissed 0\n"
    assert parse_stats_durations(text) == {19: 1, 23: 1}
    assert parse_stats(text)["ret"] == 2
    assert parse_stats_durations("pre 1\n") is None
