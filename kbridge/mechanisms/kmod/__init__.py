"""The kernel-module mechanism: insmod a generated module, stream its printk hits, rmmod it.

render.py writes the module from the templates in kmod/, kbridge.kbuild builds it,
collect.py reads its log lines. Counts come from the module's exact counters (its
unload message), never only from the log, so a lost printk line shows up as `lost`,
not as a missing hit. Only records of the kernel's own facility are read: a line
user space writes to /dev/kmsg can never pass for a hit (it is counted as forged).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from kbridge import oops, progress, sanitizers
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images.image import Image
from kbridge.mechanisms import Mechanism
from kbridge.mechanisms.engine import Totals
from kbridge.mechanisms.histogram import Log2Histogram
from kbridge.mechanisms.kmod.collect import FaultRuns, ModuleEvent, parse_event, parse_hit
from kbridge.mechanisms.kmod.render import render
from kbridge.mechanisms.refusals import explain_refusal, register_error
from kbridge.mechanisms.singlestep import insn_run
from kbridge.session import Session
from kbridge.spec import Hit, ProbeSpec
from kbridge.targets import ownership
from kbridge.targets.base import ExecResult, GuestCrash, KmsgRecord

# insmod, in the same guest command as the ledger record (kbridge.targets.ownership.recorded) and the
# kprobes/list read the engine needs: $1 is the module file, left in the guest's /tmp by an earlier run
# (exit 200: it is not there, the host writes it), the rest its parameters.
LOAD = '[ -e "$1" ] || exit 200; /sbin/insmod "$@" || exit $?; cat /sys/kernel/debug/kprobes/list'
NOT_THERE = 200
# rmmod, then whether the kernel still lists the module (exit 201), in one guest command.
UNLOAD = (
    '/sbin/rmmod "$1" || exit $?; while read -r name rest; do [ "$name" != "$1" ] || exit 201; done < /proc/modules'
)
STILL_LOADED = 201
READY_TIMEOUT_S = 30.0
UNLOAD_TIMEOUT_S = 30.0


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


BUILT = "kmod-probes.json"  # in the image's state: spec -> the module built for it, most recent last
KEEP_BUILT = 256


@functools.cache
def _sources() -> str:
    """What a probe module is made from besides its spec: the templates and their renderer."""
    from kbridge.mechanisms import templates

    h = hashlib.sha256()
    for path in [*sorted(templates.template_dir().glob("*.j2")), Path(__file__).with_name("render.py")]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _built_key(spec: ProbeSpec, image: Image) -> str:
    # What the module's text depends on (pid and tid are insmod parameters), in a stable order.
    fields = [spec.symbol, sorted(spec.handlers), spec.offset, [[a.name, a.index] for a in spec.args]]
    fields += [spec.maxactive, spec.comm, spec.fault, image.arch.name, image.krel, _sources()]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


def _remembered(image: Image) -> dict:
    try:
        known = json.loads((image.state / BUILT).read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def ready(spec: ProbeSpec, image: Image) -> BuiltProbe | None:
    """The module built for SPEC before, if it is still there: no rendering, no build, no hashing of C."""
    found = _remembered(image).get(_built_key(spec, image))
    if isinstance(found, dict) and Path(str(found.get("ko"))).is_file():
        return BuiltProbe(str(found["name"]), Path(found["ko"]))
    return None


def prepare(spec: ProbeSpec, image: Image) -> BuiltProbe:
    """Render SPEC into C and build it for IMAGE (cached): may run while the guest boots."""
    if (known := ready(spec, image)) is not None:
        return known
    from kbridge.kbuild import build_generated

    mod = render(spec, image.arch, image.krel)  # --fault on 5.14+ is refused here, before any boot
    built = BuiltProbe(mod.name, build_generated(mod.name, mod.files, image))
    with contextlib.suppress(OSError):
        known_all = _remembered(image)
        known_all.pop(key := _built_key(spec, image), None)
        known_all[key] = {"name": built.name, "ko": str(built.ko)}
        keep = dict(list(known_all.items())[-KEEP_BUILT:])
        tmp = image.state / f"{BUILT}.{os.getpid()}"
        image.state.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(keep))
        tmp.replace(image.state / BUILT)
    return built


class _Loaded:
    """The module loaded in the guest, as the engine's Armed probe: insmod on enter, rmmod on exit."""

    def __init__(self, session: Session, spec: ProbeSpec, built: BuiltProbe) -> None:
        self.session = session
        self.target = session.target
        self.spec = spec
        self.module = built.name
        self.ko = built.ko.read_bytes()
        self.run_id = os.urandom(4).hex()
        self.stream = self.target.kmsg(idle=0.02)
        self.loaded = False
        self.forged = 0
        self.faults = FaultRuns()
        self.insn_facts: dict[str, str] = {}  # how the kernel decoded the probed instruction (Arch.insn_facts)
        self._totals: Totals | None = None
        self._record: ownership.Record | None = None
        self.listed: str | None = None  # kprobes/list once loaded (the engine's armed_as reads it)

    def __enter__(self) -> _Loaded:
        target = self.target
        # Named by content and left in the guest's /tmp: a kept VM probing the same spec again loads
        # it from there, and the file is written only when it is not.
        guest_ko = f"/tmp/kbridge-{hashlib.sha256(self.ko).hexdigest()[:16]}.ko"
        params = [f"run={self.run_id}"]
        if pids := target.plumbing_pids():
            params.append("exclude=" + ",".join(map(str, pids)))
        if self.spec.pid:
            params.append(f"target_pid={self.spec.pid}")
        if self.spec.tid:
            params.append(f"target_tid={self.spec.tid}")
        try:
            ins = self._insmod(guest_ko, params)
            # Not there, or damaged (a file this fix did not yet write whole): written, then loaded again.
            if ins.exitcode == NOT_THERE or b"invalid module format" in ins.stderr:
                self._push(guest_ko)
                ins = self._insmod(guest_ko, params)
            if not ins.ok:
                raise self._load_failure(ins.stderr.decode(errors="replace"))
            self.loaded = True
            self.listed = ins.stdout.decode(errors="replace")
            self._wait_for("ready", READY_TIMEOUT_S)
        except BaseException:
            self._release()
            raise
        return self

    def _push(self, guest_ko: str) -> None:
        """The module at GUEST_KO, whole or not at all: written under another name, then renamed (a
        kbridge killed while writing leaves no file that a later probe would take for the module)."""
        part = f"{guest_ko}.{os.getpid()}.part"
        self.target.write_file(part, self.ko)
        put = 'chmod 600 "$1" && mv -f "$1" "$2"'  # root's alone: insmod loads what this file holds
        moved = self.target.run(["/bin/busybox", "sh", "-c", put, "kbridge-put", part, guest_ko], timeout=30)
        if not moved.ok:
            raise KbridgeError(
                f"cannot put the module at {guest_ko} in the guest: {moved.stderr.decode(errors='replace')}"
            )

    def _insmod(self, guest_ko: str, params: list[str]) -> ExecResult:
        """insmod, recorded in the ledger first: a killed kbridge's module is unloaded next time."""
        if self._record is not None:
            ownership.release(self.target, self._record)  # the earlier attempt loaded nothing
        load = ["/bin/busybox", "sh", "-c", LOAD, "kbridge-insmod", guest_ko, *params]
        self._record, argv = ownership.recorded(self.target, "module", self.module, load)
        return self.target.run(argv, timeout=60)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, GuestCrash):
            self.target.mark_crashed()  # nothing can be unloaded from an oopsed kernel: the VM is restarted
            return
        if self.loaded:
            # Interrupted before drain(): unload without waiting for the counts.
            self.target.run(["/sbin/rmmod", self.module], timeout=60)
            self.loaded = self.module in self.session.loaded_modules()
        self._release()

    def _release(self) -> None:
        if self._record is not None and not self.loaded:
            ownership.release(self.target, self._record)
            self._record = None

    # -- the kernel log ------------------------------------------------------------

    def _next(self) -> KmsgRecord | None:
        """The next kernel record (None when idle); an oops raises GuestCrash with its report."""
        while True:
            rec = next(self.stream)
            if rec is None:
                return None
            if not rec.from_kernel:
                if rec.text.startswith(f"{self.module}: "):
                    self.forged += 1  # written to /dev/kmsg from user space: never a hit
                continue
            # A bug checker's report (KASAN, lockdep, ...) leaves the kernel running: the probe runs
            # to its end and is removed, and the command fails with the report afterwards (targets.watch).
            if oops.is_oops(rec.text) and sanitizers.kind(rec.text) is None:
                self.target.mark_crashed()
                report = oops.collect(rec.text, _texts(self.stream))
                raise GuestCrash(crash_message(report, self.module), report)
            return rec

    def _wait_for(self, kind: str, timeout: float) -> ModuleEvent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self._next()
            ev = parse_event(rec.text, self.module) if rec else None
            if ev and ev.run == self.run_id and ev.kind == "insn" and ev.facts is not None:
                self.insn_facts = ev.facts  # printed between "planted" and "ready"
            if ev and ev.run == self.run_id and ev.kind == kind:
                return ev
        raise KbridgeError(f"{self.module}: no '{kind}' message in the guest log within {timeout:.0f} s")

    def _load_failure(self, stderr: str) -> KbridgeError:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            rec = self._next()
            ev = parse_event(rec.text, self.module) if rec else None
            if ev and ev.run == self.run_id and ev.kind == "failed":
                if ev.what == "kprobe":
                    ftraceable = self.session.is_ftraceable(self.spec.symbol)
                    return explain_refusal(
                        ev.errno, ev.what, self.session.arch, self.spec.symbol, self.spec.offset, ftraceable
                    )
                return register_error(ev.errno, ev.what, self.spec.symbol)
        return KbridgeError(f"insmod {self.module}.ko failed: {stderr.strip()}")

    def _hit(self, rec: KmsgRecord | None) -> Hit | None:
        hit = parse_hit(rec.text, self.module, self.spec.symbol, rec.usec, self.session.arch.name) if rec else None
        if hit is not None and self.spec.fault:
            self.faults.add(hit)
        return hit

    # -- Armed ----------------------------------------------------------------------

    def hits(self) -> Iterator[Hit | None]:
        while True:
            yield self._hit(self._next())

    def drain(self) -> Iterator[Hit]:
        """rmmod; the hits printed before it precede the unload message, which holds the counts."""
        rm = self.target.run(["/bin/busybox", "sh", "-c", UNLOAD, "kbridge-rmmod", self.module], timeout=60)
        if rm.exitcode == STILL_LOADED:
            raise KbridgeError(f"{self.module} is still loaded after rmmod")
        if not rm.ok:
            raise KbridgeError(f"rmmod {self.module} failed: {rm.stderr.decode(errors='replace').strip()}")
        self.loaded = False
        deadline = time.monotonic() + UNLOAD_TIMEOUT_S
        durations: Log2Histogram | None = None
        while time.monotonic() < deadline:
            rec = self._next()
            if rec is None:
                continue
            if (hit := self._hit(rec)) is not None:
                yield hit
                continue
            ev = parse_event(rec.text, self.module)
            if ev and ev.run == self.run_id and ev.kind == "durations":
                durations = Log2Histogram(ev.buckets or {}, source="module")
            if ev and ev.run == self.run_id and ev.kind == "unloaded":
                self._totals = self._settle(ev, durations)
                break
        else:
            progress.warn(f"{self.module}: the unload message did not arrive; counters unknown")

    def _settle(self, ev: ModuleEvent, durations: Log2Histogram | None) -> Totals:
        c = ev.counters or {}
        wanted = {*self.spec.handlers, *(("fault",) if self.spec.fault else ())}
        totals = Totals(
            {h: c.get(h, 0) for h in ("pre", "post", "entry", "ret", "fault") if h in wanted},
            missed=c.get("kprobe_nmissed", 0) + c.get("kretprobe_nmissed", 0),
            durations=durations,
        )
        if c.get("fault"):
            totals.notes.append(
                "kprobe_fault_handler() also counts each fault taken in a handler as "
                "missed (nmissed), so missed includes the fault hits"
            )
        if note := self.faults.note():
            totals.notes.append(note)
        if self.insn_facts:
            arch = self.session.arch
            how = insn_run(arch, "breakpoint", self.insn_facts)
            totals.notes.append(
                f"{self.spec.symbol}+{self.spec.offset:#x} on {arch.name}, when the breakpoint fires: the probed "
                f"instruction is {how} (how arch_prepare_kprobe() decoded it, read from the live kprobe)"
            )
        if self.forged:
            totals.notes.append(
                f"{self.forged} lines in the kernel log looked like {self.module}'s hits but were written "
                "from user space (/dev/kmsg): not counted"
            )
        return totals

    def totals(self) -> Totals:
        return self._totals or Totals({h: 0 for h in self.spec.handlers})


def _texts(stream: Iterator[KmsgRecord | None]) -> Iterator[str | None]:
    for rec in stream:
        yield rec.text if rec is not None else None


def crash_message(report: str, ours: str) -> str:
    """Which module the kernel blames for REPORT (the faulting frame's), never kbridge's by default."""
    site = oops.faulting_site(report)
    if site is None:
        return "the guest kernel crashed"
    where = f"in {site.module}" if site.module else "in the kernel itself"
    mine = " (kbridge's probe module)" if site.module == ours else ""
    return f"the guest kernel crashed at {site} {where}{mine}"


def arm(session: Session, spec: ProbeSpec, prepared: object = None) -> _Loaded:
    """The module built from SPEC (PREPARED, or built now), to be loaded by the engine."""
    built = prepared if isinstance(prepared, BuiltProbe) else prepare(spec, session.image)
    return _Loaded(session, spec, built)


MECHANISM = Mechanism("kmod", "default", check, prepare, arm, ready)
