"""The eBPF mechanism: bcc in the guest (the bcc image flavour), hits streamed through a perf buffer.

render.py writes the program from bpf.c.j2 and its attach plan; runner.py is pushed
into the guest and run in the bcc root filesystem with chroot; it writes lines to the
target's bpf stream, which collect.py reads (JSON, and raw hits). Counts come from a
BPF array map, so hits the perf buffer dropped show up as `lost` (and the lost
callback's count is kept in the notes), never as missing hits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from kbridge.errors import KbridgeError
from kbridge.mechanisms import Mechanism
from kbridge.mechanisms.bpf import collect
from kbridge.mechanisms.bpf.render import check, render
from kbridge.mechanisms.engine import Totals
from kbridge.session import Session
from kbridge.spec import Hit, ProbeSpec
from kbridge.targets import ownership
from kbridge.targets.base import BPF_PORT, Target

# bcc import + clang compile under TCG: 10-50 s on x86_64, 40-90 s on arm64, 3x that on a loaded host
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
RUNNER_SOURCE = Path(__file__).with_name("runner.py")
RUNNER = "/tmp/kbridge_bpf_runner.py"  # /tmp is bound into the bcc rootfs at the same path
PLAN = "/tmp/kbridge_bpf_plan.json"
SERVE_PID = "/run/kbridge/bpf-runner.pid"  # a kept runner's pid and the hash of its text (runner.py)


class BpfError(KbridgeError):
    """bcc could not compile or attach the program (nothing stays attached)."""


def require_bcc(session: Session) -> list[str]:
    """The argv prefix of the guest's python3 with bcc; a clear error when the guest has none."""
    python = session.target.bcc_python()
    if python is None:
        raise session.target.bcc_missing()  # the steps differ: the embedded VM's image, a Vagrant box
    return python


class _Attached:
    """The program compiled and attached by the guest's runner, as the engine's Armed probe."""

    def __init__(self, session: Session, spec: ProbeSpec) -> None:
        self.session = session
        self.target = session.target
        self.spec = spec
        self.python = require_bcc(session)
        self.run_id = secrets.token_hex(4)
        self.prog = render(spec, session.arch)
        self.stream = collect.messages(self.target.stream(BPF_PORT, idle=0.05), self.run_id)
        self.proc: ownership.OwnedProcess | None = None
        self.kept_pid: int | None = None  # a runner kept on a kept VM, told to run this plan
        self.kept_record: ownership.Record | None = None
        self.decoder: collect.Decoder | None = None
        self.notes: list[str] = []
        self.ended = False
        self._totals: Totals | None = None

    @property
    def pid(self) -> int:
        return self.kept_pid if self.kept_pid is not None else self.proc.pid if self.proc else 0

    def __enter__(self) -> _Attached:
        target = self.target
        plan = self.prog.plan(target.plumbing_pids(), target.stream_path(BPF_PORT), self.run_id)
        next(self.stream)  # connect the host end before the runner opens the port
        target.write_file(PLAN, json.dumps(plan).encode())
        runner = RUNNER_SOURCE.read_bytes()
        try:
            self.kept_pid = _serving_runner(target, runner) if target.kept else None
            if self.kept_pid is not None:
                # A kept runner: bcc imported, programs compiled before kept by text hash. Owned for
                # this run: if this kbridge is killed mid-run, the next command stops it.
                self.kept_record = ownership.claim_running(target, self.kept_pid)
                target.run(["/bin/busybox", "kill", "-USR1", str(self.kept_pid)], timeout=30)
            else:
                target.write_file(RUNNER, runner)
                # On a kept VM the runner stays for the next probe (runner.py --serve): it is not
                # owned then, it outlives the command on purpose; an ephemeral VM's is.
                argv = [*self.python, "-u", RUNNER, *(["--serve"] if target.kept else []), PLAN]
                self.proc = ownership.spawn(target, argv)
            ready = self._wait_ready(plan)
        except BaseException:
            self._stop_runner()
            raise
        if ready.get("layout"):
            self.decoder = collect.Decoder(ready["layout"], plan["args"], self.spec.symbol, self.session.arch.name)
        self.notes.append(
            f"bcc import {ready.get('import_s')} s, compile {ready.get('compile_s')} s"
            + (" (compiled earlier, kept by the runner)" if ready.get("cached") else "")
        )
        return self

    def _wait_ready(self, plan: dict) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        next_check = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            msg = next(self.stream)
            if msg is not None:
                if msg["ev"] == "ready":
                    return msg
                if msg["ev"] == "error":
                    stderr = msg.get("stderr") or ""
                    if not stderr and self.proc is not None and not self.target.kept:
                        stderr = self.proc.wait(timeout=30).stderr.decode(errors="replace")
                    raise _explain(msg, self.spec, stderr)
            if msg is None and self.proc is not None and (res := self.proc.poll()) is not None:
                raise BpfError(
                    f"the bcc runner exited ({res.exitcode}) before attaching: "
                    f"{(res.stderr or res.stdout).decode(errors='replace').strip()[-1500:]}"
                )
            if msg is None and self.kept_pid is not None and time.monotonic() > next_check:
                next_check = time.monotonic() + 1.0
                if not _alive(self.target, self.kept_pid):
                    raise BpfError("the kept bcc runner exited before attaching")
        raise BpfError(f"bcc did not compile and attach within {READY_TIMEOUT_S:.0f} s")

    def hits(self) -> Iterator[Hit | None]:
        while True:
            msg = next(self.stream)
            if msg is not None and msg["ev"] == "hit":
                yield collect.parse_hit(msg, self.spec.symbol, self.decoder)
            elif msg is not None and msg["ev"] == "error":
                raise BpfError(f"bcc runner failed while running: {msg.get('message')}")
            else:
                yield None

    def drain(self) -> Iterator[Hit]:
        """Stop the run: the runner detaches, drains and reports the exact counts."""
        self.target.run(["/bin/busybox", "kill", "-INT", str(self.pid)], timeout=30)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            msg = next(self.stream)
            if msg is None:
                continue
            if msg["ev"] == "hit":
                yield collect.parse_hit(msg, self.spec.symbol, self.decoder)
            elif msg["ev"] == "end":
                counts = msg["counts"]
                totals = Totals(
                    {h: counts.get(h, 0) for h in ("pre", "entry", "ret") if h in self.spec.handlers},
                    dropped=msg.get("lost") or 0,
                    notes=self.notes,
                )
                if msg.get("lost"):
                    totals.notes.append(f"perf buffer lost callback: {msg['lost']} events")
                self._totals = totals
                self.ended = True
                if self.proc is not None and not msg.get("kept"):
                    with contextlib.suppress(Exception):
                        self.proc.wait(timeout=30)
                break
            elif msg["ev"] == "error":
                raise BpfError(f"bcc runner failed while stopping: {msg.get('message')}")
        else:
            raise BpfError(f"the bcc runner did not report its counts within {STOP_TIMEOUT_S:.0f} s of being stopped")
        left = [ln for ln in self.session.kprobes_list().splitlines() if f" {self.spec.symbol}+" in ln]
        if left:
            raise BpfError(f"probes still attached after the bcc runner exited: {left}")

    def totals(self) -> Totals:
        return self._totals or Totals({h: 0 for h in self.spec.handlers}, notes=self.notes)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.ended:
            self._stop_runner()
        elif self.proc is not None and self.proc.result is None:
            self.proc.disown()  # a kept runner stays, on purpose
        if self.kept_record is not None:
            ownership.release(self.target, self.kept_record)
        with contextlib.suppress(Exception):
            self.target.close_stream(BPF_PORT)

    def _stop_runner(self) -> None:
        """Interrupted before the counts: the runner is killed, and with it every probe it attached."""
        if self.proc is not None:
            self.proc.stop()
        elif self.kept_pid is not None:
            with contextlib.suppress(Exception):
                self.target.run(["/bin/busybox", "kill", "-9", str(self.kept_pid)], timeout=10)


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


def arm(session: Session, spec: ProbeSpec, prepared: object = None) -> _Attached:
    """SPEC's program, to be compiled and attached by the guest's runner when the engine enters it."""
    return _Attached(session, spec)


MECHANISM = Mechanism("bpf", "bcc", check, None, arm)
