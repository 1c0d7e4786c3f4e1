"""`kbridge probe`: spec -> resolve -> render -> build -> target -> collect, for one mechanism.

When the symbol table of the image is already cached, the symbol is resolved
and the mechanism prepared (the module built) before the VM is up, in parallel
with its boot; a bad symbol then fails before any VM starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

from kbridge import debuginfo, kernels, progress
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.images.apt import Mirrors
from kbridge.mechanisms import get as get_mechanism
from kbridge.mechanisms.engine import HitSink, MechanismResult, StopRule
from kbridge.session import Session, cached_resolution
from kbridge.spec import Hit, ProbeSpec
from kbridge.symbols import Resolution, SymbolError
from kbridge.targets import acquire, kept_image, kept_running, parse_target
from kbridge.targets.base import Target
from kbridge.workload import Workload, default_for


@dataclass
class ProbeRun:
    """A finished probe: what was resolved, where it ran, what each mechanism saw."""

    resolution: Resolution
    arch: str
    kernel: str
    accel: str
    results: list[MechanismResult]
    workload: Workload
    target: str = "qemu"

    @property
    def hits(self) -> list[Hit]:
        """Every hit streamed to the host, in order (all mechanisms)."""
        return [h for r in self.results for h in r.hits]

    @property
    def counts(self) -> dict[str, int]:
        """Exact hits per handler (pre, post, entry, ret), whatever the stream lost."""
        out: dict[str, int] = {}
        for r in self.results:
            for h, n in r.counters.items():
                out[h] = out.get(h, 0) + n
        return out

    @property
    def result(self) -> MechanismResult:
        """The one mechanism's result (a probe runs one)."""
        return self.results[0]

    def summary(self) -> dict:
        return {
            "mechanisms": {r.mechanism: r.summary() for r in self.results},
            "symbol": self.resolution.symbol,
            "requested": self.resolution.requested,
            "arch": self.arch,
            "kernel": self.kernel,
            "accel": self.accel,
            "target": self.target,
            "workload": self.workload.description,
            "workload_exit": self.results[0].workload_exit if self.results else None,
        }


def check_offset(spec: ProbeSpec, res: Resolution) -> None:
    """An offset past the function's end would probe another function (or be truncated)."""
    if spec.offset and res.size is not None and spec.offset >= res.size:
        raise KbridgeError(
            f"--offset {spec.offset:#x} is past the end of {res.symbol}, which is {res.size:#x} bytes long",
            f"use an offset below {res.size:#x}; kbridge inspect {res.symbol} --offset N shows the instruction there",
        )


@dataclass(frozen=True)
class Plan:
    """A spec whose symbol is resolved on the target kernel and accepted by its mechanism."""

    resolution: Resolution
    spec: ProbeSpec  # with the resolved symbol (and --arg positions mapped onto a clone's)
    via: str
    notes: tuple[str, ...] = ()  # warned before the run, kept in its result


def plan(spec: ProbeSpec, resolution: Resolution, via: str, arch: Arch, krel: str) -> Plan:
    """Check SPEC once its symbol is resolved: the offset against the function, the mechanism's limits,
    --arg on a compiler clone."""
    check_offset(spec, resolution)
    resolved, notes = debuginfo.clone_args(spec.with_symbol(resolution.symbol), arch, krel)
    get_mechanism(via).check(resolved, arch)
    return Plan(resolution, resolved, via, tuple(notes))


def probe(
    spec: ProbeSpec,
    arch: Arch | str | None = None,
    workload: Workload | None = None,
    stop: StopRule = StopRule(),
    on_hit: HitSink | None = None,
    via: str = "kmod",
    kernel: str | None = None,
    mirrors: Mirrors | None = None,
    target: str | None = None,
) -> ProbeRun:
    """Probe SPEC on a guest of ARCH (and KERNEL, or TARGET) through the mechanism VIA; collect every hit.

    With the image's symbol table cached, the symbol is resolved and the module built
    while the guest boots, and a bad symbol fails before any boot.
    """
    mech = get_mechanism(via)
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    mech.check(spec, arch)  # what the mechanism refuses whatever the symbol, before any boot
    where = parse_target(target)
    suite = kernels.resolve(kernel)
    early: Plan | None = None
    prepared: object = None  # the mechanism's prepared work when it was done before ...
    pending: Future[object] | None = None  # ... or while it is done in the pool
    with _builds_end_with_the_command() as pool:
        if where.kind == "qemu":
            img = kept_image(arch, suite, mirrors)
            try:
                resolution = cached_resolution(img, spec.symbol, arch)
            except SymbolError:
                # Not the kernel's: a module loaded into the kept VM (kbridge module load) may
                # define it, which only the running guest knows. With no kept VM, fail now.
                if not kept_running(arch, suite):
                    raise
                resolution = None
            if resolution is not None:
                early = plan(spec, resolution, via, arch, img.krel)
                if mech.ready is not None and (done := mech.ready(early.spec, img)) is not None:
                    prepared = done  # no thread
                elif mech.prepare is not None:
                    pending = pool().submit(mech.prepare, early.spec, img)
        with acquire(arch, mech.flavour, kernel=suite, target=where, mirrors=mirrors) as guest:
            return probe_on(
                Session(guest),
                spec,
                early,
                workload,
                stop,
                on_hit,
                via,
                prepared if pending is None else pending.result(),
            )


@contextmanager
def _builds_end_with_the_command() -> Iterator[Callable[[], ThreadPoolExecutor]]:
    """A thread pool for work that may run while the guest boots (made on first use); a build running in
    it is killed when the command ends early (an error, Ctrl-C, SIGTERM): the pool would otherwise wait
    for it, however long it takes."""
    made: list[ThreadPoolExecutor] = []

    def pool() -> ThreadPoolExecutor:
        if not made:
            from concurrent.futures import ThreadPoolExecutor

            made.append(ThreadPoolExecutor(max_workers=1))
        return made[0]

    try:
        yield pool
    except BaseException:
        if made:
            from kbridge import kbuild

            kbuild.abort_builds()
        raise
    finally:
        for p in made:
            p.shutdown(wait=True)


def probe_on(
    session: Session,
    spec: ProbeSpec,
    planned: Plan | None = None,
    workload: Workload | None = None,
    stop: StopRule = StopRule(),
    on_hit: HitSink | None = None,
    via: str = "kmod",
    prepared: object = None,
) -> ProbeRun:
    """Probe SPEC on SESSION's guest (already acquired) through VIA."""
    if planned is None:
        planned = plan(spec, session.resolve(spec.symbol), via, session.arch, session.target.krel)
    if planned.resolution.note:
        progress.info(f"resolved {planned.resolution.note}")
    for note in planned.notes:
        progress.warn(note)
    work = workload or default_for(planned.resolution.symbol)
    result = get_mechanism(via).run(session, planned.spec, work, stop, on_hit, prepared)
    result.notes[:0] = planned.notes
    guest: Target = session.target
    return ProbeRun(planned.resolution, guest.arch.name, guest.krel, guest.accel, [result], work, guest.name)
