"""The kernel-module mechanism: insmod a generated module, stream its printk hits, rmmod it.

Counts come from the module's exact counters (its unload message), never only
from the log, so a lost printk line shows up as `lost`, not as a missing hit.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kbridge import ownership, progress
from kbridge.arch import Arch
from kbridge.build import build
from kbridge.collect.dmesg import ModuleEvent, parse_event, parse_hit
from kbridge.collect.histogram import Log2Histogram
from kbridge.errors import KbridgeError
from kbridge.images.image import Image
from kbridge.mechanisms import Mechanism
from kbridge.mechanisms.common import HitSink, MechanismResult, Stopper, StopRule, WorkloadRun
from kbridge.render.kmod import render
from kbridge.session import Session
from kbridge.spec import ProbeSpec
from kbridge.targets.base import OOPS_MARKERS, GuestCrash, KmsgRecord
from kbridge.workload import Workload

# What register_kprobe()/register_kretprobe() errors mean (kernel/kprobes.c, 6.1).
REGISTER_ERRORS: dict[int, str] = {
    errnos.ENOENT: "the symbol is not in the kernel's symbol table (kallsyms_lookup_name failed)",
    errnos.EINVAL: "the address cannot be probed: it is on the kprobe blacklist, not in kernel text, "
    "not inside the function, or (arm64) the ftrace call site or not a multiple of 4",
    errnos.EILSEQ: "the offset is not at an instruction boundary (x86_64: can_probe())",
    errnos.EBUSY: "the location is busy: another tracer owns it (e.g. an ftrace user with IPMODIFY, such as livepatch)",
    errnos.EEXIST: "this probe is already registered",
    errnos.ENOMEM: "the kernel could not allocate the probe (or a kretprobe instance pool)",
    errnos.EOPNOTSUPP: "this kind of probe is not supported here (e.g. kretprobes without "
    "CONFIG_KRETPROBES, or a kretprobe not at function entry)",
    errnos.EPERM: "probing is not permitted (kernel lockdown or a disabled kprobes subsystem)",
}


def explain_register_error(err: int, what: str, symbol: str) -> KbridgeError:
    name = errnos.errorcode.get(err, str(err))
    why = REGISTER_ERRORS.get(err, os.strerror(err))
    return KbridgeError(
        f"register_{what} on {symbol!r} failed with -{name}: {why}",
        "kbridge inspect SYMBOL shows how the kernel sees it",
    )


@dataclass(frozen=True)
class BuiltProbe:
    """A module rendered from a spec and built for one image."""

    name: str
    ko: Path


def check(spec: ProbeSpec, arch: Arch) -> None:
    """What the generated module cannot do for SPEC, said before any VM boots."""
    if arch.is_syscall_wrapper(spec.symbol):
        if bad := [a for a in spec.args if a.index > len(arch.syscall_arg_fields)]:
            raise KbridgeError(
                f"{spec.symbol} is a syscall: it has at most {len(arch.syscall_arg_fields)} "
                f"arguments, not --arg {bad[0].name}={bad[0].index}"
            )
        if spec.args and spec.offset:
            # The wrapper's first argument register holds the user pt_regs only at entry;
            # past it the register may hold anything, and dereferencing it oopses.
            raise KbridgeError(
                f"--arg with --offset {spec.offset:#x} on {spec.symbol}: the syscall's arguments are read "
                "through the user pt_regs in the first argument register, which only holds it at the "
                "function entry",
                f"drop --offset, or drop --arg to probe {spec.symbol}+{spec.offset:#x}",
            )


def prepare(spec: ProbeSpec, image: Image) -> BuiltProbe:
    """Render SPEC into C and build it for IMAGE (cached): may run while the guest boots."""
    mod = render(spec, image.arch, image.krel)  # --fault on 5.14+ is refused here, before any boot
    return BuiltProbe(mod.name, build(mod, image))


def run(
    session: Session,
    spec: ProbeSpec,
    workload: Workload,
    stop: StopRule = StopRule(),
    on_hit: HitSink | None = None,
    prepared: object = None,
) -> MechanismResult:
    """Load the module built from SPEC into the session's guest, run WORKLOAD, collect, unload."""
    built = prepared if isinstance(prepared, BuiltProbe) else prepare(spec, session.image)
    target = session.target
    module = built.name
    result = MechanismResult("kmod", spec)
    run_id = secrets.token_hex(4)
    ko = built.ko.read_bytes()
    # Named by content and left in the guest's /tmp: removing it would cost a guest
    # command per run, and a kept VM probing the same spec again overwrites it in place.
    guest_ko = f"/tmp/kbridge-{hashlib.sha256(ko).hexdigest()[:16]}.ko"
    stream = target.kmsg(idle=0.02)
    target.write_file(guest_ko, ko)
    params = [f"run={run_id}"]
    if pids := session.plumbing_pids():
        params.append("exclude=" + ",".join(map(str, pids)))
    if spec.pid:
        params.append(f"target_pid={spec.pid}")
    loaded = False
    work: WorkloadRun | None = None
    crash: list[str] = []
    record = ownership.claim(target, "module", module)  # a killed kbridge's module is unloaded by the next one
    try:
        ins = target.run(["/sbin/insmod", guest_ko, *params], timeout=60)
        if not ins.ok:
            raise _load_failure(stream, module, run_id, spec, ins.stderr.decode(errors="replace"), session)
        loaded = True
        _wait_for(stream, module, run_id, "ready", crash)
        work = WorkloadRun(target, workload)
        # No quiet time after the workload ends: every hit printed before rmmod precedes
        # the unload message, and _unload reads up to it.
        stopper = Stopper(stop, work, drain_s=0.0)
        while True:
            rec = next(stream)
            hit = None
            if rec is not None:
                if _oops(rec.text, crash):
                    break
                hit = parse_hit(rec.text, module, spec.symbol, rec.usec)
                if hit:
                    result.take(hit, stop, on_hit, work)
            if stopper.done(len(result.hits), hit is not None):
                break
    finally:
        if work:
            work.stop()
        if loaded:
            with contextlib.suppress(KbridgeError) if crash else contextlib.nullcontext():
                _unload(session, stream, module, run_id, result, stop, on_hit, crash)
        if not crash:  # unloaded (or never loaded); after an oops the VM is restarted anyway
            ownership.release(target, record)
    if crash:
        target.mark_crashed()
        raise GuestCrash(f"the guest kernel oopsed while {module} was loaded", "\n".join(crash))
    result.record_workload(work)
    return result


def _oops(text: str, crash: list[str]) -> bool:
    if crash or any(m in text for m in OOPS_MARKERS):
        crash.append(text)
        return True
    return False


def _wait_for(
    stream: Iterator[KmsgRecord | None], module: str, run_id: str, kind: str, crash: list[str], timeout: float = 30.0
) -> ModuleEvent:
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


def _load_failure(
    stream: Iterator[KmsgRecord | None], module: str, run_id: str, spec: ProbeSpec, stderr: str, session: Session
) -> KbridgeError:
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        rec = next(stream)
        if rec is None:
            continue
        ev = parse_event(rec.text, module)
        if ev and ev.run == run_id and ev.kind == "failed":
            if ev.what == "kprobe":
                from kbridge.inspect import explain_refusal, is_ftraceable  # inspect imports this module

                return explain_refusal(
                    ev.errno, session.arch, spec.symbol, spec.offset, is_ftraceable(session, spec.symbol)
                )
            return explain_register_error(ev.errno, ev.what, spec.symbol)
    return KbridgeError(f"insmod {module}.ko failed: {stderr.strip()}")


def _unload(
    session: Session,
    stream: Iterator[KmsgRecord | None],
    module: str,
    run_id: str,
    result: MechanismResult,
    stop: StopRule,
    on_hit: HitSink | None,
    crash: list[str],
) -> None:
    rm = session.target.run(["/sbin/rmmod", module], timeout=60)
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
            result.take(hit, stop, on_hit, None)
            continue
        ev = parse_event(rec.text, module)
        if ev and ev.run == run_id and ev.kind == "durations":
            result.durations = Log2Histogram(ev.buckets or {}, source="module")
        if ev and ev.run == run_id and ev.kind == "unloaded":
            c = ev.counters or {}
            wanted = {*result.spec.handlers, *(("fault",) if result.spec.fault else ())}
            result.counters = {h: c.get(h, 0) for h in ("pre", "post", "entry", "ret", "fault") if h in wanted}
            result.missed = c.get("kprobe_nmissed", 0) + c.get("kretprobe_nmissed", 0)
            if c.get("fault"):
                result.notes.append(
                    "kprobe_fault_handler() also counts each fault taken in a handler as "
                    "missed (nmissed), so missed includes the fault hits"
                )
            if stop.count is None:
                result.lost = max(0, result.total - len(result.hits))
            break
    else:
        progress.warn(f"{module}: the unload message did not arrive; counters unknown")
    if module in session.loaded_modules():
        raise KbridgeError(f"{module} is still loaded after rmmod")


MECHANISM = Mechanism("kmod", "default", check, prepare, run)
