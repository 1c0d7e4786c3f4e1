"""The eBPF mechanism: bcc in the guest (the bcc image flavour), hits streamed through a perf buffer.

kbridge/guest/bpf_runner.py is pushed into the guest with the rendered program
and its attach plan (a JSON file), run in the bcc root filesystem with chroot,
and writes JSON lines to the virtio-serial port org.kbridge.bpf. Counts come
from a BPF array map, so hits the perf buffer dropped show up as `lost` (and
the lost callback's count is kept in the notes), never as missing hits.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator

from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images.bcc import ROOTFS_MOUNT
from kbridge.mechanisms.common import HitSink, MechanismResult, StopRule, Stopper, WorkloadRun
from kbridge.render.bcc import render
from kbridge.session import Session
from kbridge.spec import Hit, ProbeSpec
from kbridge.workload import Workload

PORT = "org.kbridge.bpf"
READY_TIMEOUT_S = 180.0  # bcc import + clang compile under TCG: 6-10 s on x86_64, more on emulated arm64
RUNNER = "/tmp/kbridge_bpf_runner.py"  # /tmp is bound into the bcc rootfs at the same path
PLAN = "/tmp/kbridge_bpf_plan.json"


class BpfError(KbridgeError):
    """bcc could not compile or attach the program (nothing stays attached)."""


def has_bcc(session: Session) -> bool:
    """Whether the guest was booted with the bcc root filesystem mounted."""
    res = session.vm.run(["/bin/busybox", "test", "-x", f"{ROOTFS_MOUNT}/usr/bin/python3"], timeout=30)
    return res.exitcode == 0


def require_bcc(session: Session) -> None:
    if not has_bcc(session):
        raise KbridgeError(
            f"the {session.arch.name} guest has no bcc: it was booted from the default image, "
            "which has no python3-bpfcc",
            f"boot the bcc image: kbridge vm down --arch {session.arch.name} && "
            f"kbridge bpf up --arch {session.arch.name} (then --via bpf uses it), or use kbridge compare")


def _lines(session: Session) -> Iterator[dict | None]:
    for line in session.vm.port_lines(PORT, idle=0.05):
        if line is None:
            yield None
            continue
        with contextlib.suppress(ValueError):
            yield json.loads(line)


def run(session: Session, spec: ProbeSpec, workload: Workload, stop: StopRule = StopRule(),
        on_hit: HitSink | None = None) -> MechanismResult:
    """Compile and attach SPEC with bcc in the guest, run WORKLOAD, collect every hit, detach."""
    require_bcc(session)
    vm = session.vm
    prog = render(spec, session.arch)
    run_id = secrets.token_hex(4)
    plan = prog.plan(session.plumbing_pids(), f"/dev/virtio-ports/{PORT}", run_id)
    result = MechanismResult("bpf", spec)
    stream = _lines(session)
    next(stream)  # connect the host end before the runner opens the port
    vm.write_file(RUNNER, (GUEST_DIR / "bpf_runner.py").read_bytes())
    vm.write_file(PLAN, json.dumps(plan).encode())
    pid = vm.spawn(["/bin/busybox", "chroot", ROOTFS_MOUNT, "/usr/bin/python3", "-u", RUNNER, PLAN])
    work: WorkloadRun | None = None
    ended = False
    try:
        ready = _wait_ready(session, stream, pid, run_id, spec)
        result.notes.append(f"bcc import {ready.get('import_s')} s, compile {ready.get('compile_s')} s")
        work = WorkloadRun(vm, workload)
        stopper = Stopper(stop, work)
        while True:
            msg = next(stream)
            hit = msg is not None and msg.get("run") == run_id and msg["ev"] == "hit"
            if hit:
                if stop.count is None or len(result.hits) < stop.count:
                    _take(result, msg, on_hit, time.monotonic() - work.started)
            elif msg is not None and msg.get("run") == run_id and msg["ev"] == "error":
                raise BpfError(f"bcc runner failed while running: {msg.get('message')}")
            if stopper.done(len(result.hits), hit):
                break
        if work:
            work.stop()
        _finish(session, stream, pid, run_id, result, stop, on_hit)
        ended = True
    finally:
        if work:
            work.stop()
        if not ended:
            with contextlib.suppress(Exception):
                vm.run(["/bin/busybox", "kill", "-9", str(pid)], timeout=10)
                vm.agent.wait(pid, timeout=10)
        vm.close_port(PORT)
    if work and work.result:
        result.workload_exit = work.result.exitcode
        result.workload_output = (work.result.stdout + work.result.stderr).decode(errors="replace")
    return result


def _take(result: MechanismResult, msg: dict, on_hit: HitSink | None, since_start: float | None) -> None:
    hit = Hit(mechanism="bpf", symbol=result.spec.symbol, handler=msg["h"], pid=msg["pid"], comm=msg["comm"],
              cpu=msg["cpu"], args=dict(msg.get("args", {})), retval=msg.get("ret"), timestamp=msg.get("ts"))
    if result.first_event_s is None and since_start is not None:
        result.first_event_s = since_start
    result.hits.append(hit)
    if on_hit:
        on_hit(hit)


def _wait_ready(session: Session, stream: Iterator[dict | None], pid: int, run_id: str, spec: ProbeSpec) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        msg = next(stream)
        if msg is not None and msg.get("run") == run_id:
            if msg["ev"] == "ready":
                return msg
            if msg["ev"] == "error":
                res = session.vm.agent.wait(pid, timeout=30)
                raise _explain(msg, spec, res.stderr.decode(errors="replace"))
        if msg is None and (res := session.vm.poll(pid)) is not None:
            raise BpfError(f"the bcc runner exited ({res.exitcode}) before attaching: "
                           f"{(res.stderr or res.stdout).decode(errors='replace').strip()[-1500:]}")
    raise BpfError(f"bcc did not compile and attach within {READY_TIMEOUT_S:.0f} s")


def _explain(msg: dict, spec: ProbeSpec, stderr: str) -> BpfError:
    stage = msg.get("stage")
    detail = msg.get("message", "").strip()
    diag = "\n".join(ln for ln in stderr.splitlines() if "error" in ln.lower())[-1500:]
    if stage == "compile":
        return BpfError(f"bcc could not compile the program for {spec.symbol!r}: {detail[:300]}\n{diag}",
                        "kbridge bpf render shows the program; nothing was attached")
    if stage == "attach":
        return BpfError(f"bcc could not attach to {spec.symbol!r}"
                        f"{'+%#x' % spec.offset if spec.offset else ''}: {detail}",
                        "kbridge inspect SYMBOL shows how the kernel sees it; nothing stays attached")
    return BpfError(f"the bcc runner failed ({stage}): {detail}\n{diag}")


def _finish(session: Session, stream: Iterator[dict | None], pid: int, run_id: str, result: MechanismResult,
            stop: StopRule, on_hit: HitSink | None) -> None:
    """Stop the runner (it detaches, drains and reports the exact counts), then check nothing stays attached."""
    session.vm.run(["/bin/busybox", "kill", "-INT", str(pid)], timeout=30)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        msg = next(stream)
        if msg is None or msg.get("run") != run_id:
            continue
        if msg["ev"] == "hit":
            if stop.count is None or len(result.hits) < stop.count:
                _take(result, msg, on_hit, None)
        elif msg["ev"] == "end":
            counts = msg["counts"]
            result.counters = {h: counts.get(h, 0) for h in ("pre", "entry", "ret") if h in result.spec.handlers}
            if stop.count is None:
                result.lost = max(0, result.total - len(result.hits))
            if msg.get("lost"):
                result.notes.append(f"perf buffer lost callback: {msg['lost']} events")
                result.lost = max(result.lost, msg["lost"]) if stop.count is None else result.lost
            break
        elif msg["ev"] == "error":
            raise BpfError(f"bcc runner failed while stopping: {msg.get('message')}")
    else:
        raise BpfError("the bcc runner did not report its counts within 60 s of being stopped")
    with contextlib.suppress(Exception):
        session.vm.agent.wait(pid, timeout=30)
    left = [ln for ln in session.kprobes_list().splitlines() if f" {result.spec.symbol}+" in ln]
    if left:
        raise BpfError(f"probes still attached after the bcc runner exited: {left}")
