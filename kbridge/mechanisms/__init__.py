"""The three ways to drive a kprobe, behind one interface, from a ProbeSpec to a MechanismResult.

kmod: a generated kernel module; tracefs: kprobe_events; bpf: bcc in the guest.
Each module defines MECHANISM; `get(name)` imports only the one asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kbridge.errors import KbridgeError

if TYPE_CHECKING:
    from kbridge.arch import Arch
    from kbridge.images.image import Image
    from kbridge.mechanisms.engine import HitSink, MechanismResult, StopRule
    from kbridge.session import Session
    from kbridge.spec import ProbeSpec
    from kbridge.workload import Workload

NAMES = ("kmod", "tracefs", "bpf")


class RunFn(Protocol):
    def __call__(
        self,
        session: Session,
        spec: ProbeSpec,
        workload: Workload,
        stop: StopRule,
        on_hit: HitSink | None = None,
        prepared: object = None,
    ) -> MechanismResult: ...


@dataclass(frozen=True)
class Mechanism:
    """One mechanism: what it needs, what it refuses offline, how it runs.

    check(spec, arch): refusals knowable before any VM boots (raises KbridgeError).
    prepare(spec, image): work that can start while the guest boots (the module build);
      its result is passed to run() as `prepared`. None: nothing to prepare.
    run(session, spec, workload, stop, on_hit, prepared): arm, run the workload, collect,
      disarm; the guest is left as it was found, whatever happens.
    """

    name: str
    flavour: str  # the image flavour it needs ("bcc" for eBPF)
    check: Callable[[ProbeSpec, Arch], None]
    prepare: Callable[[ProbeSpec, Image], object] | None
    run: RunFn


def get(name: str) -> Mechanism:
    """The mechanism NAME (kmod, tracefs or bpf), imported on first use."""
    if name not in NAMES:
        raise KbridgeError(f"unknown mechanism {name!r}", f"use one of: {', '.join(NAMES)}")
    mech: Mechanism = importlib.import_module(f"kbridge.mechanisms.{name}").MECHANISM
    return mech
