"""`kbridge probe`: spec -> resolve -> render -> build -> target -> collect, for one mechanism.

When the symbol table of the image is already cached, the symbol is resolved
and the module built before the VM is up, in parallel with its boot; a bad
symbol then fails before any VM starts.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kbridge import progress
from kbridge.arch import Arch, get_arch
from kbridge.build import build
from kbridge.images import image as images
from kbridge.images.apt import Mirrors
from kbridge.mechanisms import kmod, mechanism
from kbridge.mechanisms.common import HitSink, MechanismResult, StopRule
from kbridge.render.kmod import render
from kbridge.session import Session, cached_blacklist, cached_symbols, open_target
from kbridge.spec import ProbeSpec
from kbridge.symbols import Resolution
from kbridge.targets.qemu import QemuVM
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

    def summary(self) -> dict:
        mechs = {}
        for r in self.results:
            entry = {"hits": r.total, "counters": r.counters, "streamed": len(r.hits)}
            entry["missed" if r.mechanism == "kmod" else "lost"] = r.missed if r.mechanism == "kmod" else r.lost
            if r.mechanism == "kmod":
                entry["lost"] = r.lost
            if r.first_event_s is not None:
                entry["first_event_s"] = round(r.first_event_s, 6)
            mechs[r.mechanism] = entry
        return {"mechanisms": mechs, "symbol": self.resolution.symbol, "requested": self.resolution.requested,
                "arch": self.arch, "kernel": self.kernel, "accel": self.accel,
                "workload": self.workload.description}


def _vm_image(arch: Arch, suite: str, mirrors: Mirrors | None) -> images.Image:
    kept = QemuVM.attach(arch)
    if kept:
        kept.detach()
        return kept.image
    return images.ensure(arch, suite, mirrors)


def probe(spec: ProbeSpec, arch: Arch | str | None = None, workload: Workload | None = None,
          stop: StopRule = StopRule(), on_hit: HitSink | None = None, via: str = "kmod",
          suite: str = images.DEFAULT_SUITE, mirrors: Mirrors | None = None) -> ProbeRun:
    """Probe SPEC on a guest of ARCH through the mechanism VIA and collect every hit."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    img = _vm_image(arch, suite, mirrors)
    table, blacklist = cached_symbols(img), cached_blacklist(img)
    with ThreadPoolExecutor(max_workers=1) as pool:
        early: Future[Path] | None = None
        resolution = None
        if table is not None and blacklist is not None:
            resolution = table.resolve(spec.symbol, arch, blacklist)  # fails before any boot
            if via == "kmod":
                early = pool.submit(build, render(spec.with_symbol(resolution.symbol), arch), img)
        with open_target(arch, suite, mirrors, bcc=via == "bpf") as vm:
            session = Session(vm)
            if resolution is None:
                resolution = session.resolve(spec.symbol)
            if resolution.note:
                progress.info(f"resolved {resolution.note}")
            resolved = spec.with_symbol(resolution.symbol)
            work = workload or default_for(resolution.symbol)
            if via == "kmod":
                mod = render(resolved, arch)
                ko = early.result() if early is not None else build(mod, vm.image)
                result = kmod.run(session, resolved, ko, mod.name, work, stop, on_hit)
            else:
                result = mechanism(via)(session, resolved, work, stop, on_hit)
            return ProbeRun(resolution, arch.name, vm.krel, vm.accel, [result], work)
