"""The kernel-module mechanism: insmod a generated module, stream its printk hits, rmmod it.

Counts come from the module's exact counters (its unload message), never only
from the log, so a lost printk line shows up as `lost`, not as a missing hit.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import secrets
import time
from pathlib import Path

from kbridge import progress
from kbridge.collect.dmesg import parse_event, parse_hit
from kbridge.errors import KbridgeError
from kbridge.mechanisms.common import HitSink, MechanismResult, Stopper, StopRule, WorkloadRun
from kbridge.session import Session
from kbridge.spec import ProbeSpec
from kbridge.targets.base import OOPS_MARKERS, GuestCrash
from kbridge.workload import Workload

# What register_kprobe()/register_kretprobe() errors mean (kernel/kprobes.c, 6.1).
REGISTER_ERRORS: dict[int, str] = {
    errnos.ENOENT: "the symbol is not in the kernel's symbol table (kallsyms_lookup_name failed)",
    errnos.EINVAL: "the address cannot be probed: it is on the kprobe blacklist, not in kernel text, "
                   "or the offset is not inside the function / not at an instruction boundary",
    errnos.EILSEQ: "the offset is not at an instruction boundary (or, on arm64, it is the ftrace "
                   "call site, which kprobes refuse on 6.1)",
    errnos.EBUSY: "the location is busy: another tracer owns it (e.g. an ftrace user with IPMODIFY, "
                  "such as livepatch)",
    errnos.EEXIST: "this probe is already registered",
    errnos.ENOMEM: "the kernel could not allocate the probe (or a kretprobe instance pool)",
    errnos.EOPNOTSUPP: "this kind of probe is not supported here (e.g. kretprobes without "
                       "CONFIG_KRETPROBES, or a kretprobe not at function entry)",
    errnos.EPERM: "probing is not permitted (kernel lockdown or a disabled kprobes subsystem)",
}


def explain_register_error(err: int, what: str, symbol: str) -> KbridgeError:
    name = errnos.errorcode.get(err, str(err))
    why = REGISTER_ERRORS.get(err, os.strerror(err))
    return KbridgeError(f"register_{what} on {symbol!r} failed with -{name}: {why}",
                        "kbridge inspect SYMBOL shows how the kernel sees it")


def run(session: Session, spec: ProbeSpec, ko: Path, module: str, workload: Workload,
        stop: StopRule = StopRule(), on_hit: HitSink | None = None) -> MechanismResult:
    """Load KO (built from SPEC) into the session's guest, run WORKLOAD, collect, unload."""
    vm = session.vm
    result = MechanismResult("kmod", spec)
    run_id = secrets.token_hex(4)
    guest_ko = f"/tmp/{module}.ko"
    stream = vm.kmsg()
    vm.write_file(guest_ko, ko.read_bytes())
    params = [f"run={run_id}"]
    if pids := session.plumbing_pids():
        params.append("exclude=" + ",".join(map(str, pids)))
    if spec.pid:
        params.append(f"target_pid={spec.pid}")
    loaded = False
    work: WorkloadRun | None = None
    crash: list[str] = []
    try:
        ins = vm.run(["/sbin/insmod", guest_ko, *params], timeout=60)
        if not ins.ok:
            raise _load_failure(stream, module, run_id, spec.symbol, ins.stderr.decode(errors="replace"))
        loaded = True
        _wait_for(stream, module, run_id, "ready", crash)
        work = WorkloadRun(vm, workload)
        stopper = Stopper(stop, work)
        while True:
            rec = next(stream)
            hit = None
            if rec is not None:
                if _oops(rec.text, crash):
                    break
                hit = parse_hit(rec.text, module, spec.symbol, rec.usec)
                if hit and (stop.count is None or len(result.hits) < stop.count):
                    result.first_event_s = result.first_event_s or time.monotonic() - work.started
                    result.hits.append(hit)
                    if on_hit:
                        on_hit(hit)
            if stopper.done(len(result.hits), hit is not None):
                break
    finally:
        if work:
            work.stop()
        if loaded:
            with contextlib.suppress(KbridgeError) if crash else contextlib.nullcontext():
                _unload(session, stream, module, run_id, result, stop, on_hit, crash)
        with contextlib.suppress(Exception):
            vm.run(["/bin/busybox", "rm", "-f", guest_ko], timeout=10)
    if crash:
        (vm.rundir / "crashed").touch()
        raise GuestCrash(f"the guest kernel oopsed while {module} was loaded", "\n".join(crash))
    if work and work.result:
        result.workload_exit = work.result.exitcode
        result.workload_output = (work.result.stdout + work.result.stderr).decode(errors="replace")
    return result


def _oops(text: str, crash: list[str]) -> bool:
    if crash or any(m in text for m in OOPS_MARKERS):
        crash.append(text)
        return True
    return False


def _wait_for(stream, module: str, run_id: str, kind: str, crash: list[str], timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = next(stream)
        if rec is None:
            continue
        _oops(rec.text, crash)
        ev = parse_event(rec.text, module)
        if ev and ev.run == run_id and ev.kind == kind:
            return ev
    raise KbridgeError(f"{module}: no '{kind}' message in the guest log within {timeout:.0f} s")


def _load_failure(stream, module: str, run_id: str, symbol: str, stderr: str) -> KbridgeError:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        rec = next(stream)
        if rec is None:
            continue
        ev = parse_event(rec.text, module)
        if ev and ev.run == run_id and ev.kind == "failed":
            return explain_register_error(ev.errno, ev.what, symbol)
    return KbridgeError(f"insmod {module}.ko failed: {stderr.strip()}")


def _unload(session: Session, stream, module: str, run_id: str, result: MechanismResult,  # type: ignore[no-untyped-def]
            stop: StopRule, on_hit: HitSink | None, crash: list[str]) -> None:
    vm = session.vm
    rm = vm.run(["/sbin/rmmod", module], timeout=60)
    if not rm.ok:
        raise KbridgeError(f"rmmod {module} failed: {rm.stderr.decode(errors='replace').strip()}")
    # Hits printed before unregistering precede the unload message in the log.
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        rec = next(stream)
        if rec is None:
            continue
        if _oops(rec.text, crash):
            return
        hit = parse_hit(rec.text, module, result.spec.symbol, rec.usec)
        if hit:
            if stop.count is None or len(result.hits) < stop.count:
                result.hits.append(hit)
                if on_hit:
                    on_hit(hit)
            continue
        ev = parse_event(rec.text, module)
        if ev and ev.run == run_id and ev.kind == "unloaded":
            c = ev.counters or {}
            result.counters = {h: c.get(h, 0) for h in ("pre", "post", "entry", "ret") if h in result.spec.handlers}
            result.missed = c.get("kprobe_nmissed", 0) + c.get("kretprobe_nmissed", 0)
            if stop.count is None:
                result.lost = max(0, result.total - len(result.hits))
            break
    else:
        progress.warn(f"{module}: the unload message did not arrive; counters unknown")
    if module in session.loaded_modules():
        raise KbridgeError(f"{module} is still loaded after rmmod")
