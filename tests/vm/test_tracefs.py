"""The tracefs mechanism on the real 6.1 kernels (x86_64 and arm64 guests).

Every test checks that the guest's kprobe_events is exactly what it was before.
"""

from __future__ import annotations

import pytest

from kbridge import kprobe_events
from kbridge.errors import KbridgeError
from kbridge.mechanisms import tracefs
from kbridge.mechanisms.engine import StopRule
from kbridge.mechanisms.tracefs import guest
from kbridge.session import Session
from kbridge.spec import make_spec
from kbridge.workload import Workload
from tests.vm.fetch import arg

T = "/sys/kernel/tracing"
TEXT = 'kbridge says "hi" x=1'  # spaces, quotes and a NAME=VALUE look-alike, then \n


def snapshot(session: Session) -> tuple[str, str, str]:
    """kprobe_events, buffer_size_kb and the run directories (kbridge/guest/tracefs.sh keeps a run's
    state in one until it is undone): the guest state a run must leave as it found it."""
    vm = session.target
    size = vm.read_file(f"{T}/buffer_size_kb").decode()
    if "expanded" in size:
        # "7 (expanded: 1408)": a fresh kernel grows its boot-time buffer on the first
        # use of tracing, which no run can undo; grow it now so before == after.
        vm.write_file(f"{T}/buffer_size_kb", size.split("expanded:")[1].strip(" )\n").encode())
        size = vm.read_file(f"{T}/buffer_size_kb").decode()
    runs = vm.run(["/bin/sh", "-c", "ls -d /run/kbridge/tracefs-* 2>/dev/null; true"]).text
    return (vm.read_file(f"{T}/kprobe_events").decode(), size, runs)


def sh(cmd: str) -> Workload:
    return Workload.shell(cmd)


@pytest.mark.vm
def test_fetch_arg_kinds_and_types(kbridge_session: Session) -> None:
    """$argN, user-string derefs, pt_regs derefs of the syscall wrapper, $comm, $retval."""
    s = kbridge_session
    before = snapshot(s)
    off = s.arch.syscall_arg_offsets
    wrapper = s.arch.syscall_entry("write")
    a1, a2, a3 = (arg(s.arch, n) for n in (1, 2, 3))
    lines = [
        f"p:kbt/w ksys_write fd={a1}:u64 buf=+0({a2}):ustring count={a3}:u64 c=$comm",
        f"p:kbt/sw {wrapper} fd=+{off[0]}({a1}):s32 buf=+0(+{off[1]}({a1})):ustring "
        f"count=+{off[2]}({a1}):x64 first=+0(+{off[1]}({a1})):u8",
        "r:kbt/wr ksys_write ret=$retval:s64",
    ]
    if not s.arch.is_syscall_wrapper(wrapper):  # 32-bit arm: sys_write takes its arguments itself
        lines[1] = f"p:kbt/sw {wrapper} fd={a1}:s32 buf=+0({a2}):ustring count={a3}:x64 first=+0({a2}):u8"
    # busybox sh's printf is a builtin: one write(1, TEXT"\n") by the shell itself.
    res = tracefs.run_lines(s, lines, sh(f"printf '%s\\n' '{TEXT}' > /tmp/kbt"), comm="sh")
    n = len(TEXT) + 1
    assert res.counters == {"kbt/w": 1, "kbt/sw": 1, "kbt/wr": 1}, res.hits
    by = {h.event: h for h in res.hits}  # type: ignore[attr-defined]
    assert by["kbt/w"].args == {"fd": 1, "buf": TEXT + "\n", "count": n, "c": "sh"}
    assert by["kbt/sw"].args == {"fd": 1, "buf": TEXT + "\n", "count": n, "first": ord("k")}
    assert by["kbt/wr"].retval == n and by["kbt/wr"].handler == "ret"
    assert all(h.mechanism == "tracefs" and h.comm == "sh" for h in res.hits)
    assert res.lost == 0 and res.missed == 0 and res.workload_exit == 0
    assert snapshot(s) == before


@pytest.mark.vm
def test_probe_spec_via_tracefs(kbridge_session: Session) -> None:
    """The same ProbeSpec as the module path: args by position, through pt_regs for sys_write."""
    s = kbridge_session
    before = snapshot(s)
    sym = s.resolve("sys_write").symbol
    spec = make_spec(sym, {"pre", "ret"}, ["fd=1", "count=3"], s.arch, comm="dd")
    res = tracefs.MECHANISM.run(s, spec, sh("dd if=/dev/zero of=/dev/null bs=7 count=3 2>/dev/null"))
    data = [h for h in res.hits if h.handler == "pre" and h.args["fd"] == 1]
    assert [h.args["count"] for h in data] == [7, 7, 7]
    rets = [h.retval for h in res.hits if h.handler == "ret"]
    assert rets.count(7) == 3 and all("ret" not in h.args for h in res.hits if h.handler == "ret")
    assert res.counters["pre"] == res.counters["ret"] >= 3
    assert snapshot(s) == before


@pytest.mark.vm
def test_filters_pid_and_comm(kbridge_session: Session) -> None:
    s = kbridge_session
    before = snapshot(s)
    line = f"p:kbt/w ksys_write fd={arg(s.arch, 1)}:u64 count={arg(s.arch, 3)}:u64"
    res = tracefs.run_lines(
        s,
        [line],
        sh("printf abc >/dev/null; printf abcde >/dev/null; printf xy >/dev/null"),
        filter="count == 5",
        comm="sh",
    )
    assert [(h.comm, h.args["count"]) for h in res.hits] == [("sh", 5)]
    # --pid: only the spawned process's write, not the workload's identical one. The other process
    # writes once the workload (started only when the probe is armed) says so: no timing guess.
    go, done = "/tmp/kbt-pid-go", "/tmp/kbt-pid-done"
    s.target.run(["/bin/busybox", "rm", "-f", go, done])
    other = s.target.spawn(
        ["/bin/sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; printf 12345 >/dev/null; touch {done}"]
    )
    try:
        work = sh(f"printf 12345 >/dev/null; touch {go}; while [ ! -e {done} ]; do sleep 0.05; done")
        res = tracefs.run_lines(s, [line], work, pid=other, filter="count == 5")
    finally:
        s.target.wait(other, timeout=30)
    assert [(h.pid, h.args["count"]) for h in res.hits] == [(other, 5)]
    assert snapshot(s) == before


@pytest.mark.vm
def test_kernel_verdicts_match_offline(kbridge_session: Session) -> None:
    """Good lines are accepted; bad lines get the same class and caret offline and from error_log."""
    s = kbridge_session
    reg = s.arch.arg_registers[1]
    a1, a2 = arg(s.arch, 1), arg(s.arch, 2)
    good = [
        f'p:kbv/a ksys_write fd=%{reg} +8($stack):u32 $comm x=\\123 s=\\"abc" b={a1}:b3@2/32',
        "r5:kbv/b vfs_read%return",
        f"p:kbv.c vfs_read arr=+0({a2}):x8[4] sym={a1}:symbol",
        "p vfs_write",
    ]
    bad = [
        "p:kbv/d ksys_write fd=%zz",
        "p:kbv/e ksys_write ret=$retval",
        "r:kbv/f ksys_write+8",
        "p:kbv/g ksys_write x=+0(%ax",
        "p:kbv/h ksys_write a=$arg1 a=$arg2",
        "p:kbv/i ksys_write x=$arg1:u12",
        "p:kbv/j ksys_write x=$arg1:string",
        "p:kbv/9bad ksys_write",
        "p:kbv/k ksys_write y=$comm.x",
        "r4097:kbv/l vfs_read",
        "p:kbv/m ksys_write x=+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(+0($arg1))))))))))))))",
    ]
    before = snapshot(s)
    for line in good:
        ev = kprobe_events.parse(line, s.grammar)
        guest.define(s.target, line)
        guest.remove(s.target, ev)  # type: ignore[arg-type]
    for line in bad:
        with pytest.raises(kprobe_events.EventSyntaxError) as offline:
            kprobe_events.parse(line, s.grammar)
        with pytest.raises(kprobe_events.EventSyntaxError) as kernel:
            guest.define(s.target, line)
        got = (kernel.value.error, kernel.value.kernel_position, kernel.value.command)
        assert got == (offline.value.error, offline.value.kernel_position, offline.value.command), line
    assert snapshot(s) == before


@pytest.mark.vm
def test_clean_state_after_failures(kbridge_session: Session) -> None:
    s = kbridge_session
    vm = s.target
    vm.write_file(f"{T}/kprobe_events", b"p:kbtkeep/keep vfs_read\n", mode="a")  # the user's own
    try:
        before = snapshot(s)
        bad_offset = "ksys_write+1"  # not an instruction start on either arch
        with pytest.raises(kprobe_events.EventSyntaxError) as e:
            tracefs.run_lines(s, ["p:kbt/ok ksys_write", f"p:kbt/bad {bad_offset}"], sh("true"))
        assert e.value.error in ("BAD_INSN_BNDRY", "FAIL_REG_PROBE") and e.value.position == 10
        assert snapshot(s) == before
        with pytest.raises(KbridgeError, match="already has a kprobe event kbtkeep/keep"):
            tracefs.run_lines(s, ["p:kbtkeep/keep ksys_write"], sh("true"))
        with pytest.raises(KbridgeError, match="Field not found"):
            tracefs.run_lines(s, ["p:kbt/ok ksys_write"], sh("true"), filter="nosuchfield == 1")
        assert snapshot(s) == before
        res = tracefs.run_lines(s, ["p:kbt/ok ksys_write"], sh("echo x; exit 3"), comm="sh", buffer_kb=64)
        assert res.workload_exit == 3 and res.counters == {"kbt/ok": 1}
        assert snapshot(s) == before

        def interrupt(hit: object) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            tracefs.run_lines(
                s, ["p:kbt/ok ksys_write"], sh("while :; do echo x; done"), on_hit=interrupt, comm="sh", buffer_kb=32
            )
        assert snapshot(s) == before
        # The agent is in step again after the interruption: a new run works.
        res = tracefs.run_lines(s, ["p:kbt/ok ksys_write"], sh("echo x"), comm="sh")
        assert res.counters == {"kbt/ok": 1}
    finally:
        vm.write_file(f"{T}/kprobe_events", b"-:kbtkeep/keep\n", mode="a")
    assert "kbt" not in vm.read_file(f"{T}/kprobe_events").decode()


@pytest.mark.vm
def test_more_events_than_the_ring_buffer_holds(kbridge_session: Session) -> None:
    """hits == the exact number of calls == read + lost, with a ring buffer far too small to hold them."""
    s = kbridge_session
    before = snapshot(s)
    calls = 3000
    # 512 bytes of stack per event: a 4 KiB buffer (2 pages) holds about 15 of them.
    line = f"p:kbt/w ksys_write fd={arg(s.arch, 1)}:u64 count={arg(s.arch, 3)}:u64 pad=+0($stack):x64[64]"
    res = tracefs.run_lines(
        s,
        [line],
        sh(f"dd if=/dev/zero of=/dev/null bs=1 count={calls} 2>/dev/null"),
        StopRule(),
        filter="fd == 1",
        comm="dd",
        buffer_kb=4,
    )
    assert all((h.args["fd"], h.args["count"], len(h.args["pad"])) == (1, 1, 64) for h in res.hits)
    assert res.lost > 0, "the buffer held everything: the test proves nothing"
    assert len(res.hits) > 0
    print(f"\nload: {calls} calls -> {len(res.hits)} read + {res.lost} lost")
    assert res.total == len(res.hits) + res.lost == calls, (res.total, len(res.hits), res.lost, res.notes)
    assert snapshot(s) == before
