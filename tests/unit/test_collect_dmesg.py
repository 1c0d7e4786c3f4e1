"""Parsing what the module prints (lines captured from a bookworm guest)."""

from kbridge.collect.dmesg import parse_event, parse_hit, parse_stats
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
    assert parse_hit(f"kb_other_1: hit=pre pid=1 tid=1 cpu=0 comm=x", MOD, "s") is None


def test_lifecycle_events():
    assert parse_event(f"{MOD}: ready run=ab12", MOD).kind == "ready"
    f = parse_event(f"{MOD}: register_kprobe failed: -84 run=ab12", MOD)
    assert (f.kind, f.errno, f.what) == ("failed", 84, "kprobe")
    u = parse_event(f"{MOD}: unloaded run=ab12 pre=4 post=4 entry=0 ret=0 kprobe_nmissed=0 kretprobe_nmissed=0", MOD)
    assert u.counters == {"pre": 4, "post": 4, "entry": 0, "ret": 0, "kprobe_nmissed": 0, "kretprobe_nmissed": 0}
    assert parse_stats("pre 3\npost 3\nkprobe_nmissed 0\n") == {"pre": 3, "post": 3, "kprobe_nmissed": 0}
