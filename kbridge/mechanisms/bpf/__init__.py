"""The eBPF mechanism: kbridge's CO-RE probe, compiled on the host, loaded in the guest by a libbpf loader.

plan.py turns a ProbeSpec into the loader's options (nothing is compiled per probe: the one
object, kbridge/guest/bpf/probe.bpf.c, takes the probe as load-time configuration);
kbridge.images.bpftools builds the loader and the object and puts them in the guest's initramfs.
The loader writes lines to the target's bpf stream, which collect.py reads (JSON, and raw hit
records). Counts come from per-CPU counters in the kernel, and hits the ring buffer had no room
for are counted there too: they show up as `lost`, never as missing hits. Any guest with a BTF
kernel runs it: the default image, a Vagrant box (the files are pushed on first use).
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import time
from collections.abc import Iterator
from types import TracebackType

from kbridge.errors import KbridgeError
from kbridge.images import bpftools
from kbridge.mechanisms import Mechanism
from kbridge.mechanisms.bpf import collect
from kbridge.mechanisms.bpf.plan import check, has_func_ip, plan
from kbridge.mechanisms.engine import Totals
from kbridge.mechanisms.refusals import explain_refusal
from kbridge.session import Session
from kbridge.spec import Hit, ProbeSpec
from kbridge.targets import ownership
from kbridge.targets.base import BPF_PORT, Target

READY_TIMEOUT_S = 120.0  # the loader's open + load + attach: 0.1-0.6 s under TCG, seconds on a loaded host
STOP_TIMEOUT_S = 60.0
POLL_S = 0.25  # how often a loader that has not said "ready" is checked for having exited


class BpfError(KbridgeError):
    """The eBPF loader could not load or attach the probe (nothing stays attached)."""


class _NotInGuest(Exception):
    """The guest has no loader at the path the tools' digest names: they are pushed."""


class _Attached:
    """The probe loaded and attached by the guest's loader, as the engine's Armed probe."""

    def __init__(self, session: Session, spec: ProbeSpec) -> None:
        self.session = session
        self.target = session.target
        self.spec = spec
        self.plan = plan(spec, session.arch)
        self.run_id = os.urandom(4).hex()
        self.stream = collect.messages(self.target.stream(BPF_PORT, idle=0.05), self.run_id)
        self.proc: ownership.OwnedProcess | None = None
        self.decoder = collect.Decoder([a.name for a in spec.args], spec.symbol, session.arch.name)
        self.notes: list[str] = []
        self.ended = False
        self._totals: Totals | None = None

    def __enter__(self) -> _Attached:
        tools = bpftools.built(self.session.image) or bpftools.ensure(self.session.image)
        next(self.stream)  # connect the host end before the loader opens the port
        try:
            try:
                ready = self._start(tools)
            except _NotInGuest:
                push(self.target, tools)
                ready = self._start(tools)
        except BaseException:
            self._stop_loader()
            raise
        if ready.get("format") != collect.FORMAT:
            self._stop_loader()
            raise BpfError(
                f"the guest's eBPF loader writes records of format {ready.get('format')}, not {collect.FORMAT}"
            )
        ms = ready.get("ms") or {}
        self.notes.append(
            f"eBPF loader: open {ms.get('open')} ms, load and verify {ms.get('load')} ms, attach {ms.get('attach')} ms"
        )
        return self

    def _start(self, tools: bpftools.BpfTools) -> dict:
        target = self.target
        d = tools.guest_dir
        argv = self.plan.argv(
            f"{d}/kbridge-bpf",
            f"{d}/probe.bpf.o",
            f"{d}/min.btf",
            target.plumbing_pids(),
            target.stream_path(BPF_PORT),
            self.run_id,
            has_func_ip(target.krel),
        )
        self.proc = ownership.spawn(target, argv)
        return self._wait_ready()

    def _wait_ready(self) -> dict:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        next_poll = 0.0
        while time.monotonic() < deadline:
            msg = next(self.stream)
            if msg is not None:
                if msg["ev"] == "ready":
                    return msg
                if msg["ev"] == "error":
                    raise self._explain(msg)
                continue
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_S
                if (res := self.proc.poll()) is not None:
                    stderr = res.stderr.decode(errors="replace")
                    if res.exitcode == 127 and "can't execute" in stderr:
                        raise _NotInGuest
                    raise BpfError(
                        f"the eBPF loader exited ({res.exitcode}) before attaching: "
                        f"{(stderr or res.stdout.decode(errors='replace')).strip()[-1500:]}"
                    )
        raise BpfError(f"the eBPF loader did not load and attach within {READY_TIMEOUT_S:.0f} s")

    def _explain(self, msg: dict) -> BpfError:
        stage, err, detail = msg.get("stage"), int(msg.get("errno") or 0), str(msg.get("message", "")).strip()
        spec = self.spec
        if stage == "attach":
            # The kernel's register_kprobe() refused it, as it would a module's kprobe: the same causes.
            where = f"{spec.symbol}+{spec.offset:#x}" if spec.kprobe else spec.symbol
            if not err:
                return BpfError(
                    f"the eBPF probe could not attach to {where!r}: {detail}",
                    "kbridge inspect SYMBOL shows how the kernel sees it; nothing stays attached",
                )
            ftraceable = err == errnos.EINVAL and self.session.is_ftraceable(spec.symbol)
            what = "kprobe" if spec.kprobe else "kretprobe"
            why = explain_refusal(err, what, self.session.arch, spec.symbol, spec.offset, ftraceable)
            return BpfError(f"the eBPF probe could not attach to {where!r}: {why.message}", why.hint)
        if stage == "load":
            return BpfError(
                f"the kernel refused kbridge's eBPF probe ({errnos.errorcode.get(err, err)}): {detail}",
                "run the loader with --verbose in the guest (kbridge bpf render shows its command line)",
            )
        return BpfError(f"the eBPF loader failed ({stage}): {detail}")

    def hits(self) -> Iterator[Hit | None]:
        while True:
            msg = next(self.stream)
            if msg is not None and msg["ev"] == "hit":
                yield self.decoder.hit(msg["raw"])
            elif msg is not None and msg["ev"] == "error":
                raise BpfError(f"the eBPF loader failed while running: {msg.get('message')}")
            else:
                yield None

    def drain(self) -> Iterator[Hit]:
        """Stop the run: the loader detaches, drains the ring buffer and reports the exact counts."""
        assert self.proc is not None
        self.target.run(["/bin/busybox", "kill", "-INT", str(self.proc.pid)], timeout=30)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            msg = next(self.stream)
            if msg is None:
                continue
            if msg["ev"] == "hit":
                yield self.decoder.hit(msg["raw"])
            elif msg["ev"] == "end":
                self._totals = self._settle(msg)
                self.ended = True
                with contextlib.suppress(KbridgeError):
                    self.proc.wait(timeout=30)  # it exits once the counts are out: its probes go with it
                break
            elif msg["ev"] == "error":
                raise BpfError(f"the eBPF loader failed while stopping: {msg.get('message')}")
        else:
            raise BpfError(f"the eBPF loader did not report its counts within {STOP_TIMEOUT_S:.0f} s of being stopped")

    def _settle(self, msg: dict) -> Totals:
        counts, lost = msg.get("counts") or {}, msg.get("lost") or {}
        handlers = [h for h in ("pre", "entry", "ret") if h in self.spec.handlers]
        dropped = sum(int(lost.get(h, 0)) for h in handlers) + int(msg.get("unsent") or 0)
        totals = Totals({h: int(counts.get(h, 0)) for h in handlers}, dropped=dropped, notes=self.notes)
        if dropped:
            totals.notes.append(f"the ring buffer had no room for {dropped} hits (counted in the kernel, not streamed)")
        if msg.get("noslot"):
            totals.notes.append(
                f"{msg['noslot']} entries found the in-flight table full: their returns were not reported"
            )
        return totals

    def totals(self) -> Totals:
        return self._totals or Totals({h: 0 for h in self.spec.handlers}, notes=self.notes)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.ended:
            self._stop_loader()
        with contextlib.suppress(Exception):
            self.target.close_stream(BPF_PORT)

    def _stop_loader(self) -> None:
        """Interrupted before the counts: the loader is killed, and with it every probe it attached."""
        if self.proc is not None:
            self.proc.stop()


def push(target: Target, tools: bpftools.BpfTools) -> None:
    """Copy the loader, the object and its BTF into a guest booted without them (once per guest)."""
    from kbridge import progress

    with progress.step(f"copying kbridge's eBPF loader into {target.name} (once)"):
        res = target.run(["/bin/busybox", "mkdir", "-p", tools.guest_dir], timeout=30)
        if not res.ok:
            raise BpfError(
                f"cannot create {tools.guest_dir} in the guest: {res.stderr.decode(errors='replace').strip()}"
            )
        for guest, host, mode in tools.guest_files():
            tmp = f"{guest}.part"
            target.write_file(tmp, host.read_bytes())
            res = target.run(
                ["/bin/busybox", "sh", "-c", 'chmod "$1" "$2" && mv "$2" "$3"', "sh", oct(mode)[2:], tmp, guest]
            )
            if not res.ok:
                raise BpfError(f"cannot install {guest} in the guest: {res.stderr.decode(errors='replace').strip()}")


def arm(session: Session, spec: ProbeSpec, prepared: object = None) -> _Attached:
    """SPEC's probe, to be loaded and attached by the guest's loader when the engine enters it."""
    return _Attached(session, spec)


MECHANISM = Mechanism("bpf", "default", check, None, arm)
