"""The eBPF mechanism: bcc in the guest (the bcc image flavour), hits streamed through a perf buffer.

kbridge/guest/bpf_runner.py is pushed into the guest with the rendered program
and its attach plan (a JSON file), run in the bcc root filesystem with chroot,
and writes lines to the target's bpf stream (kbridge.collect.bpf): JSON, and raw hits. Counts come
from a BPF array map, so hits the perf buffer dropped show up as `lost` (and
the lost callback's count is kept in the notes), never as missing hits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Iterator

from kbridge import ownership
from kbridge.collect import bpf as collect
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.mechanisms import Mechanism
from kbridge.mechanisms.common import HitSink, MechanismResult, Stopper, StopRule, WorkloadRun
from kbridge.render.bcc import check, render
from kbridge.session import Session
from kbridge.spec import ProbeSpec
from kbridge.targets.base import BPF_PORT, ExecResult, Target
from kbridge.workload import Workload

READY_TIMEOUT_S = (
    600.0  # bcc import + clang compile under TCG: 10-50 s on x86_64, 40-90 s on arm64, 3x that on a loaded host
)
RUNNER = "/tmp/kbridge_bpf_runner.py"  # /tmp is bound into the bcc rootfs at the same path
PLAN = "/tmp/kbridge_bpf_plan.json"
SERVE_PID = "/run/kbridge/bpf-runner.pid"  # a kept runner's pid and the hash of its text (bpf_runner.py)


class BpfError(KbridgeError):
    """bcc could not compile or attach the program (nothing stays attached)."""


def require_bcc(session: Session) -> list[str]:
    """The argv prefix of the guest's python3 with bcc; a clear error when the guest has none."""
    python = session.target.bcc_python()
    if python is None:
        arch = session.arch.name
        raise KbridgeError(
            f"{session.target.name} has no bcc: it was booted from the default image, which has no python3-bpfcc",
            f"stop it (kbridge vm down --arch {arch}) so --via bpf boots the bcc image, or keep one with "
            f"kbridge bpf up --arch {arch}",
        )
    return python


def run(
    session: Session,
    spec: ProbeSpec,
    workload: Workload,
    stop: StopRule = StopRule(),
    on_hit: HitSink | None = None,
    prepared: object = None,
) -> MechanismResult:
    """Compile and attach SPEC with bcc in the guest, run WORKLOAD, collect every hit, detach."""
    python = require_bcc(session)
    target = session.target
    prog = render(spec, session.arch)
    run_id = secrets.token_hex(4)
    plan = prog.plan(session.plumbing_pids(), target.stream_path(BPF_PORT), run_id)
    result = MechanismResult("bpf", spec)
    stream = collect.messages(target.stream(BPF_PORT, idle=0.05), run_id)
    next(stream)  # connect the host end before the runner opens the port
    target.write_file(PLAN, json.dumps(plan).encode())
    runner = (GUEST_DIR / "bpf_runner.py").read_bytes()
    server = _serving_runner(target, runner) if target.kept else None
    handle: int | None = None
    if server is not None:
        pid = server  # a kept runner: bcc imported, programs compiled before kept by text hash
        target.run(["/bin/busybox", "kill", "-USR1", str(pid)], timeout=30)
    else:
        target.write_file(RUNNER, runner)
        # On a kept VM the runner stays for the next probe (bpf_runner.py --serve).
        handle = target.spawn([*python, "-u", RUNNER, *(["--serve"] if target.kept else []), PLAN])
        pid = target.guest_pid(handle)
    work: WorkloadRun | None = None
    ended = False
    record = None
    try:
        # A killed kbridge's runner stays attached: the next command stops it.
        record = ownership.claim_process(target, pid)
        ready = _wait_ready(session, stream, handle, pid, spec)
        decoder = (
            collect.Decoder(ready["layout"], plan["args"], spec.symbol, session.arch.name)
            if ready.get("layout")
            else None
        )
        result.notes.append(
            f"bcc import {ready.get('import_s')} s, compile {ready.get('compile_s')} s"
            + (" (compiled earlier, kept by the runner)" if ready.get("cached") else "")
        )
        work = WorkloadRun(target, workload)
        stopper = Stopper(stop, work)
        while True:
            msg = next(stream)
            hit = msg is not None and msg["ev"] == "hit"
            if msg is not None and hit:
                result.take(collect.parse_hit(msg, spec.symbol, decoder), stop, on_hit, work)
            elif msg is not None and msg["ev"] == "error":
                raise BpfError(f"bcc runner failed while running: {msg.get('message')}")
            if stopper.done(len(result.hits), hit):
                break
        work.stop()
        _finish(session, stream, handle, pid, result, stop, on_hit, decoder)
        ended = True
    finally:
        if work:
            work.stop()
        if not ended:
            with contextlib.suppress(Exception):
                target.run(["/bin/busybox", "kill", "-9", str(pid)], timeout=10)
                if handle is not None:
                    target.wait(handle, timeout=10)
        if record is not None:
            ownership.release(target, record)
        target.close_stream(BPF_PORT)
    result.record_workload(work)
    return result


def _serving_runner(target: Target, runner: bytes) -> int | None:
    """The pid of the kept runner of this very runner text, if one waits in the guest."""
    try:
        pid_text, digest = target.read_file(SERVE_PID).decode().split()
        cmdline = target.read_file(f"/proc/{int(pid_text)}/cmdline")
    except (KbridgeError, ValueError):
        return None
    if b"--serve" not in cmdline or RUNNER.encode() not in cmdline:
        return None  # gone, and the pid reused
    if digest != hashlib.sha256(runner).hexdigest():
        # Started by another kbridge version: replace it.
        with contextlib.suppress(KbridgeError):
            target.run(["/bin/busybox", "kill", pid_text], timeout=10)
        return None
    return int(pid_text)


def _alive(target: Target, pid: int) -> bool:
    try:
        return RUNNER.encode() in target.read_file(f"/proc/{pid}/cmdline")
    except KbridgeError:
        return False


def _wait_ready(session: Session, stream: Iterator[dict | None], handle: int | None, pid: int, spec: ProbeSpec) -> dict:
    target = session.target
    deadline = time.monotonic() + READY_TIMEOUT_S
    next_check = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        msg = next(stream)
        if msg is not None:
            if msg["ev"] == "ready":
                return msg
            if msg["ev"] == "error":
                stderr = msg.get("stderr") or ""
                if not stderr and handle is not None and not target.kept:
                    stderr = target.wait(handle, timeout=30).stderr.decode(errors="replace")
                raise _explain(msg, spec, stderr)
        res2: ExecResult | None
        if msg is None and handle is not None and (res2 := target.poll(handle)) is not None:
            raise BpfError(
                f"the bcc runner exited ({res2.exitcode}) before attaching: "
                f"{(res2.stderr or res2.stdout).decode(errors='replace').strip()[-1500:]}"
            )
        if msg is None and handle is None and time.monotonic() > next_check:
            next_check = time.monotonic() + 1.0
            if not _alive(target, pid):
                raise BpfError("the kept bcc runner exited before attaching")
    raise BpfError(f"bcc did not compile and attach within {READY_TIMEOUT_S:.0f} s")


def _explain(msg: dict, spec: ProbeSpec, stderr: str) -> BpfError:
    stage = msg.get("stage")
    detail = msg.get("message", "").strip()
    diag = "\n".join(ln for ln in stderr.splitlines() if "error" in ln.lower())[-1500:]
    if stage == "compile":
        return BpfError(
            f"bcc could not compile the program for {spec.symbol!r}: {detail[:300]}\n{diag}",
            "kbridge bpf render shows the program; nothing was attached",
        )
    if stage == "attach":
        return BpfError(
            f"bcc could not attach to {spec.symbol!r}{f'+{spec.offset:#x}' if spec.offset else ''}: {detail}",
            "kbridge inspect SYMBOL shows how the kernel sees it; nothing stays attached",
        )
    return BpfError(f"the bcc runner failed ({stage}): {detail}\n{diag}")


def _finish(
    session: Session,
    stream: Iterator[dict | None],
    handle: int | None,
    pid: int,
    result: MechanismResult,
    stop: StopRule,
    on_hit: HitSink | None,
    decoder: collect.Decoder | None,
) -> None:
    """Stop the run (the runner detaches, drains and reports the exact counts), then check nothing stays attached."""
    target = session.target
    target.run(["/bin/busybox", "kill", "-INT", str(pid)], timeout=30)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        msg = next(stream)
        if msg is None:
            continue
        if msg["ev"] == "hit":
            result.take(collect.parse_hit(msg, result.spec.symbol, decoder), stop, on_hit, None)
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
    if handle is not None and not msg.get("kept"):
        with contextlib.suppress(Exception):
            target.wait(handle, timeout=30)
    left = [ln for ln in session.kprobes_list().splitlines() if f" {result.spec.symbol}+" in ln]
    if left:
        raise BpfError(f"probes still attached after the bcc runner exited: {left}")


MECHANISM = Mechanism("bpf", "bcc", check, None, run)
