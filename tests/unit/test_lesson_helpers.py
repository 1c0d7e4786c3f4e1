"""Pure helpers behind the walk-through's lesson: single-step pairing, the duration histogram, tracefs steps."""

import dataclasses
from typing import ClassVar

from kbridge.arch import ARM64, X86_64
from kbridge.mechanisms.histogram import Log2Histogram, bucket_of, bucket_range, durations_of, pair_durations
from kbridge.mechanisms.kmod.collect import parse_hit
from kbridge.mechanisms.singlestep import StepPairer
from kbridge.mechanisms.tracefs.steps import Step, StepReporter, shell_quote, syscall_rewrite_note
from kbridge.spec import Hit
from kbridge.targets.base import ExecResult

# Captured from a bookworm x86_64 guest (6.1.0-56-amd64), ksys_write+0x5 --pre --post.
MOD = "kb_ksys_write_acbe64d6"
PRE = parse_hit(
    f"{MOD}: hit=pre pid=152 tid=152 cpu=0 addr=0xffffffff81367685 ip=0xffffffff81367686 flags=0x202 comm=sh",
    MOD,
    "ksys_write",
    arch="x86_64",
)
POST = parse_hit(
    f"{MOD}: hit=post pid=152 tid=152 cpu=0 addr=0xffffffff81367685 ip=0xffffffff81367687 flags=0x202 comm=sh",
    MOD,
    "ksys_write",
    arch="x86_64",
)


def test_single_step_pairs_pre_and_post_of_one_thread():
    p = StepPairer()
    pre, post = dataclasses.replace(PRE, mode="breakpoint"), dataclasses.replace(POST, mode="breakpoint")
    assert p.feed(pre) is None
    step = p.feed(post)
    assert step is not None and step.length == 2  # push %r13 (41 55)
    assert "ip 0xffffffff81367686 -> 0xffffffff81367687" in step.text()
    assert "after the int3 (0xcc)" in step.text() and "2-byte instruction was single-stepped" in step.text()
    assert p.feed(post) is None  # a post without its pre


def test_the_text_follows_the_mode_the_kernel_armed():
    """A probe armed as an ftrace callback has no trap and no single-step: the text must not say one
    happened (captured: ksys_write+0 on 6.1 x86_64, kprobes/list [FTRACE])."""
    p = StepPairer()
    pre = dataclasses.replace(PRE, mode="ftrace", addr=0xFFFFFFFF81367680, ip=0xFFFFFFFF81367681)
    post = dataclasses.replace(POST, mode="ftrace", addr=0xFFFFFFFF81367680, ip=0xFFFFFFFF81367685)
    p.feed(pre)
    text = p.feed(post).text()  # type: ignore[union-attr]
    assert text.startswith("ftrace, no trap and no single-step") and "single-stepped" not in text
    assert "5-byte ftrace call site" in text


def test_log2_buckets_match_the_modules_fls64():
    assert [bucket_of(n) for n in (0, 1, 2, 3, 4, 343996, 7597474)] == [0, 1, 2, 2, 3, 19, 23]
    assert bucket_range(0) == (0, 0) and bucket_range(19) == (262144, 524287)
    h = Log2Histogram({19: 1, 23: 1}, source="module")
    assert h.total == 2 and len(h.rows()) == 5  # empty buckets between are shown
    j = h.to_json()
    assert j["source"] == "module" and sum(b["count"] for b in j["buckets"]) == 2
    assert j["buckets"][0] == {"low": 262144, "high": 524287, "count": 1}
    lines = h.text()
    assert lines[1].split()[:3] == ["262144", "->", "524287"] and "|" + "*" * 40 + "|" in lines[1]


def test_return_hits_pair_with_their_threads_entry():
    def hit(handler: str, tid: int, ts: float) -> Hit:
        return Hit("tracefs", "vfs_read", handler, pid=tid, comm="dd", cpu=0, timestamp=ts, tid=tid)

    hits = [
        hit("entry", 1, 1.000000),
        hit("entry", 2, 1.000002),
        hit("ret", 2, 1.000010),
        hit("ret", 1, 1.000500),
        hit("ret", 3, 2.0),
    ]
    paired = pair_durations(hits)
    assert [h.duration_ns for h in paired] == [8000, 500000]
    assert hits[-1].duration_ns is None  # no entry seen for tid 3
    assert durations_of(hits).total == 2


class FakeTarget:
    """Files and directory listings as a 6.1 guest showed them (captured)."""

    files: ClassVar[dict[str, bytes]] = {
        "/sys/kernel/tracing/kprobe_events": b"p:kprobes/sys_write_event __x64_sys_write\n",
        "/sys/kernel/tracing/events/kprobes/sys_write_event/enable": b"0\n",
        "/sys/kernel/tracing/events/kprobes/sys_write_event/filter": b"none\n",
    }

    def read_file(self, path: str) -> bytes:
        return self.files[path]

    def run(self, argv, stdin=None, timeout=None):
        return ExecResult(0, b"enable\nfilter\nformat\nhist\nid\ntrigger\n", b"")


def test_steps_read_back_what_the_kernel_shows():
    seen: list[Step] = []
    rep = StepReporter(FakeTarget(), seen.append)
    rep.defined("p:sys_write_event __x64_sys_write", "kprobes", "sys_write_event")
    assert seen[0].command == "echo 'p:sys_write_event __x64_sys_write' >> kprobe_events"
    assert seen[0].readback == {"kprobe_events": "p:kprobes/sys_write_event __x64_sys_write\n"}
    assert seen[1].command == "ls events/kprobes/sys_write_event/"
    assert seen[1].readback["events/kprobes/sys_write_event/"].startswith("enable filter format")
    assert seen[1].readback["events/kprobes/sys_write_event/filter"] == "none\n"
    assert shell_quote("it's") == "'it'\\''s'"


def test_syscall_rewrite_says_why_the_kernel_would_refuse():
    note = syscall_rewrite_note("sys_write", "__x64_sys_write", X86_64)
    assert "would refuse 'sys_write'" in note and "4.17" in note and "Invalid probed address or symbol" in note
    assert "4.19" in syscall_rewrite_note("sys_write", "__arm64_sys_write", ARM64)
    assert syscall_rewrite_note("ksys_write", "ksys_write", X86_64) is None
    assert syscall_rewrite_note("vfs_read", "vfs_read.isra.0", X86_64) is None


def test_the_offset_kprobes_list_gives():
    from kbridge.inspect import listed_offset

    # The kprobes/list line format; an IBT kernel (x86_64 6.12+) lists an entry probe at +0x4.
    assert listed_offset("ffffffff81367684  k  ksys_write+0x4    [DISABLED][FTRACE]", 0) == 4
    assert listed_offset("ffffffff81367680  k  ksys_write+0x0    [FTRACE]", 9) == 0
    assert listed_offset("", 7) == 7
