"""The kprobe walk-through's lesson on real guests: the single-step seen in the registers, the return
time of each call with its histogram, and the fault handler where the kernel still has it."""

from __future__ import annotations

import pytest

import kbridge
from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.inspect import inspect
from kbridge.mechanisms.histogram import bucket_of
from kbridge.probe import probe_on
from kbridge.session import Session
from kbridge.spec import Hit, make_spec
from kbridge.workload import Workload

pytestmark = pytest.mark.vm

# Exactly 3 write() calls of 7 bytes to /dev/null, then dd's own report to fd 2.
DD = Workload(("/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=7", "count=3"), "dd bs=7 count=3")


def _insn_len(session: Session, symbol: str, offset: int) -> int:
    """The length of the instruction at SYMBOL+OFFSET: objdump of the bytes the running kernel has there."""
    lines = inspect(session, symbol, offset).disasm["before"]
    first, second = (int(line.split(":", 1)[0], 16) for line in lines[:2])
    return second - first


def _pairs(hits: list[Hit]) -> list[tuple[Hit, Hit]]:
    """Each pre hit with the post hit that follows it on the same thread."""
    out, open_pre = [], {}
    for h in hits:
        if h.handler == "pre":
            open_pre[h.tid] = h
        elif h.handler == "post" and h.tid in open_pre:
            out.append((open_pre.pop(h.tid), h))
    return out


@pytest.mark.parametrize("where", ["entry", "inside"])
def test_post_handler_runs_after_the_single_stepped_instruction(kbridge_session: Session, where: str) -> None:
    name = kbridge_session.arch.name
    arm64 = name in ("arm64", "arm")  # fixed 4-byte instructions, pc at the breakpoint itself
    # x86_64: +0 is the ftrace site (the kernel emulates the step over its 5-byte nop); +5 is the
    # next instruction, an int3 that is really single-stepped (a post-handler forbids jump optimization).
    # arm64: +0 and +8 (+4 is the ftrace site, refused) are both BRK #4, single-stepped.
    # arm: +0 (push) and +4 (sub) are the undefined instruction, emulated by the trap handler.
    offset = 0 if where == "entry" else {"arm64": 8, "arm": 4}.get(name, 5)
    length = 4 if arm64 else _insn_len(kbridge_session, "ksys_write", offset)
    spec = make_spec("ksys_write", {"pre", "post"}, [], kbridge_session.arch, offset=offset, comm="dd")
    run = probe_on(kbridge_session, spec, workload=DD)
    r = run.result
    pairs = _pairs(r.hits)
    assert len(pairs) == r.counters["pre"] == r.counters["post"] >= 3
    addr = pairs[0][0].addr
    assert addr is not None and addr % (4 if arm64 else 1) == 0
    for pre, post in pairs:
        assert pre.addr == post.addr == addr
        if name == "arm":
            # The undefined instruction leaves pc at the probe; the emulated instruction moves it past.
            assert pre.ip == addr and post.ip == addr + 4
            assert pre.flags is not None and pre.flags & 0x1F == 0x13  # cpsr: SVC mode
            assert pre.to_json()["pc"] == f"{pre.ip:#x}" and "cpsr" in pre.to_json()
        elif arm64:
            # BRK: the pre-handler sees pc at the probe address, the post-handler past the 4-byte step.
            assert pre.ip == addr and post.ip == addr + 4
            assert pre.flags is not None and pre.flags & 0xF == 0x5  # pstate: EL1h
            assert pre.to_json()["pc"] == f"{pre.ip:#x}" and "pstate" in pre.to_json()
        else:
            # int3 (or its ftrace emulation): ip = addr + 1 in the pre-handler, addr + length after the step.
            assert pre.ip == addr + 1
            assert post.ip == addr + length
            assert post.ip - pre.ip == length - 1
            assert pre.flags is not None and pre.flags & 0x2  # EFLAGS bit 1 is always set
            assert pre.to_json()["ip"] == f"{pre.ip:#x}" and "flags" in pre.to_json()


def test_return_durations_and_their_histogram(kbridge_session: Session) -> None:
    spec = make_spec("ksys_write", {"entry", "ret"}, ["fd=1"], kbridge_session.arch, comm="dd")
    run = probe_on(kbridge_session, spec, workload=DD)
    r = run.result
    rets = [h for h in r.hits if h.handler == "ret"]
    assert len(rets) == r.counters["ret"] >= 3
    assert all(h.duration_ns is not None and h.duration_ns > 0 for h in rets)
    # The module's own histogram counts every call, exactly; each streamed duration is in it.
    hist = r.durations
    assert hist is not None and hist.source == "module"
    assert hist.total == r.counters["ret"]
    for h in rets:
        assert hist.buckets.get(bucket_of(h.duration_ns), 0) > 0
    j = run.summary()["mechanisms"]["kmod"]["durations"]
    assert sum(b["count"] for b in j["buckets"]) == r.counters["ret"]


def test_fault_handler_on_a_kernel_without_it_is_refused_and_nothing_loads(kbridge_session: Session) -> None:
    if kbridge_session.target.krel.startswith("5.10"):
        pytest.skip("5.10 still has fault_handler: see test_fault_handler_fires_on_5_10")
    spec = make_spec("ksys_write", {"pre"}, [], kbridge_session.arch, fault=True)
    before = kbridge_session.loaded_modules()
    with pytest.raises(KbridgeError) as e:
        probe_on(kbridge_session, spec, workload=DD)
    assert "removed in Linux 5.14" in e.value.message and kbridge_session.target.krel in e.value.message
    assert kbridge_session.loaded_modules() == before


def test_fault_handler_fires_on_5_10(kbridge_arch: str) -> None:
    # fault_handler exists through 5.13: a 5.10 guest of its own, whatever --kbridge-kernel says.
    with kbridge.vm(arch=kbridge_arch, kernel="5.10") as vm, vm.session() as s:
        assert s.target.krel.startswith("5.10.")
        spec = make_spec("ksys_write", {"pre", "post"}, [], s.arch, comm="dd", fault=True)
        run = probe_on(s, spec, workload=DD)
    r = run.result
    faults = [h for h in r.hits if h.handler == "fault"]
    # The pre-handler reads an unmapped user address: each call takes page faults inside the handler
    # (x86_64: two, the bulk copy and its byte-wise retry after the exception-table fixup).
    assert r.counters["pre"] >= 3 and len(faults) >= r.counters["pre"]
    assert r.counters["fault"] == len(faults)
    # x86 passes the vector (#PF, 14), arm64 the ESR (EC 0x25: data abort taken at EL1), arm the FSR.
    for f in faults:
        assert f.addr == faults[0].addr and f.ip is not None and f.ip != f.addr
        assert f.trap is not None and get_arch(kbridge_arch).is_data_fault(f.trap)
    assert r.counters["post"] == r.counters["pre"]  # the fixup let the probed function go on
    # Each fault names its faulting instruction; why a run took two is said from those sites.
    assert all(f.fault_at for f in faults), faults
    repeated = [n for n in r.notes if "handler run(s) took" in n]
    if kbridge_arch == "x86_64":
        assert len(faults) == 2 * r.counters["pre"]
        assert faults[0].fault_at.startswith("copy_user_") and faults[1].fault_at.startswith("copy_user_")
        assert repeated and ".Lcopy_user_handle_tail" in repeated[0] and faults[1].fault_at in repeated[0]
    elif kbridge_arch == "arm":
        # 5.10 armmp: one fault per call in arm_copy_from_user, the FSR of a page translation fault.
        assert len(faults) == r.counters["pre"] and not repeated
        assert faults[0].fault_at.startswith("arm_copy_from_user+")
        decoded = faults[0].to_json()["trap_decoded"]
        assert decoded.startswith("FSR 0x17: page translation fault, on a read"), decoded
    else:
        assert len(faults) == r.counters["pre"] and not repeated  # arm64's fixup returns at once
        assert faults[0].fault_at.startswith("__arch_copy_from_user+")
        decoded = faults[0].to_json()["trap_decoded"]
        assert decoded.startswith("ESR 0x96000006: EC 0x25 data abort in the kernel, level 2 translation fault")


def test_trace_steps_show_every_file_of_the_walkthrough(kbridge_session: Session) -> None:
    from kbridge.mechanisms import tracefs
    from kbridge.mechanisms.tracefs.steps import Step

    s = kbridge_session
    wrapper = s.arch.syscall_entry("write")
    before = s.target.read_file("/sys/kernel/tracing/kprobe_events").decode()
    steps: list[Step] = []
    hits: list = []
    res = tracefs.run_lines(
        s,
        ["p:sys_write_event sys_write"],
        Workload.shell("echo hi > /tmp/kb_lesson"),
        on_hit=hits.append,
        comm="sh",
        steps=steps.append,
    )
    # Where tracefs is: both the walk-through's path (inside debugfs) and its own, one filesystem.
    assert steps[0].command.startswith("grep") and "tracefs" in steps[0].readback["/proc/mounts"]
    where = steps[1]
    assert where.command == "cd /sys/kernel/tracing"
    dirs = where.readback
    assert dirs["/sys/kernel/tracing"].startswith("exists (device:inode ")
    assert dirs["/sys/kernel/tracing"] == dirs["/sys/kernel/debug/tracing"]
    assert "same tracefs" in where.note
    # Each hit carries the kernel's own trace line, which kbridge's fields were read from.
    assert hits and all(h.raw.split()[0] == f"{h.comm}-{h.pid}" and "sys_write_event: (" in h.raw for h in hits)
    # The literal line names a symbol the kernel no longer has: said, and rewritten (not on arm,
    # which has no syscall wrappers: sys_write is there as written).
    if s.arch.is_syscall_wrapper(wrapper):
        assert any("would refuse 'sys_write'" in n and wrapper in n for n in res.notes)
    else:
        assert not any("would refuse" in n for n in res.notes)
    cmds = [st.command.split("   #")[0] for st in steps]  # without the explaining comment
    d = "events/kprobes/sys_write_event"
    order = [
        f"echo 'p:sys_write_event {wrapper}' >> kprobe_events",
        f"ls {d}/",
        f"echo '1' > {d}/enable",
        "cat trace_pipe",
        f"echo '0' > {d}/enable",
        "cat kprobe_profile",
        "echo '-:kprobes/sys_write_event' >> kprobe_events",
        "ls events/kprobes/",
    ]
    at = [cmds.index(o) for o in order]
    assert at == sorted(at), cmds
    by = {st.command.split("   #")[0]: st.readback for st in steps}
    assert by[order[0]]["kprobe_events"].splitlines()[-1] == f"p:kprobes/sys_write_event {wrapper}"
    listing = by[f"ls {d}/"]
    assert {"enable", "filter", "format", "id", "trigger"} <= set(listing[f"{d}/"].split())
    assert listing[f"{d}/enable"] == "0\n" and listing[f"{d}/filter"] == "none\n"
    filt = next(st for st in steps if st.command.endswith(f"> {d}/filter"))
    assert 'comm == "sh"' in filt.readback[f"{d}/filter"]  # the kernel's own rendering of it
    assert "common_pid !=" in filt.readback[f"{d}/filter"] and "kbridge adds 'common_pid != ...'" in filt.note
    assert by[order[2]][f"{d}/enable"] == "1\n" and by[order[4]][f"{d}/enable"] == "0\n"
    profile = by["cat kprobe_profile"]["kprobe_profile"].split()
    i = profile.index("sys_write_event")
    assert int(profile[i + 1]) >= res.counters["kprobes/sys_write_event"] >= 1  # fired >= passed the filter
    assert "sys_write_event" not in by[order[6]]["kprobe_events"]
    assert "sys_write_event" not in by["ls events/kprobes/"]["events/kprobes/"]  # the directory went with it
    assert s.target.read_file("/sys/kernel/tracing/kprobe_events").decode() == before


def test_trace_steps_show_error_log_when_the_kernel_refuses(kbridge_session: Session) -> None:
    from kbridge import kprobe_events
    from kbridge.mechanisms import tracefs
    from kbridge.mechanisms.tracefs.steps import Step

    s = kbridge_session
    steps: list[Step] = []
    # Offline the line is fine; only the kernel knows +1 is inside ksys_write's first instruction.
    with pytest.raises(kprobe_events.EventSyntaxError):
        tracefs.run_lines(s, ["p:kbt/inside ksys_write+1"], DD, steps=steps.append)
    failed = [st for st in steps if not st.ok]
    assert failed and failed[0].command == "echo 'p:kbt/inside ksys_write+1' >> kprobe_events"
    log = failed[0].readback["error_log"]
    assert "trace_kprobe: error:" in log and "p:kbt/inside ksys_write+1" in log


def test_trace_return_pairs_have_durations(kbridge_session: Session) -> None:
    from kbridge.mechanisms import tracefs
    from kbridge.mechanisms.histogram import durations_of

    res = tracefs.run_lines(kbridge_session, ["p:kbt/w ksys_write", "r:kbt/wr ksys_write"], DD, comm="dd")
    rets = [h for h in res.hits if h.handler == "ret"]
    assert len(rets) == res.counters["kbt/wr"] >= 3
    assert all(h.duration_ns is not None and h.duration_ns > 0 for h in rets)
    hist = durations_of(res.hits)
    assert hist is not None and hist.total == len(rets)
    assert sum(b["count"] for b in res.summary()["durations"]["buckets"]) == len(rets)


def test_bpf_hits_carry_the_probe_address_registers_and_durations(session: Session) -> None:
    """eBPF sees the probe address (bpf_get_func_ip), the registers and, per call, the return time."""
    from kbridge.mechanisms import bpf
    from kbridge.mechanisms.engine import StopRule

    arm64 = session.arch.name == "arm64"
    spec = make_spec("ksys_write", {"pre", "entry", "ret"}, [], session.arch, comm="dd")
    r = bpf.MECHANISM.run(session, spec, DD, StopRule())
    pre = [h for h in r.hits if h.handler == "pre"]
    rets = [h for h in r.hits if h.handler == "ret"]
    assert len(pre) == r.counters["pre"] >= 3 and len(rets) == r.counters["ret"] >= 3
    old = session.target.krel.startswith("5.10")  # bpf_get_func_ip() for kprobes came in 5.15
    for h in pre:
        assert h.flags is not None and h.ip is not None and h.ip == pre[0].ip
        if old:
            assert h.addr is None
        else:
            assert h.addr is not None and h.ip == (h.addr if arm64 else h.addr + 1)  # BRK leaves pc; int3: +1
    assert all(h.duration_ns is not None and h.duration_ns > 0 for h in rets)
    assert sum(b["count"] for b in r.summary()["durations"]["buckets"]) == r.counters["ret"]
