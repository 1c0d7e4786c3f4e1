"""The three ways to drive a kprobe, behind one interface, from a ProbeSpec to a MechanismResult.

kmod: a generated kernel module; tracefs: kprobe_events; bpf: an eBPF program. Each is a
package holding its renderer, templates, collector and guest-side helper, and defines
MECHANISM (check, prepare, arm); engine.py runs any of them (drive()). `get(name)` imports
only the one asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kbridge.errors import KbridgeError
from kbridge.mechanisms.engine import Armed, HitSink, MechanismResult, StopRule, drive

if TYPE_CHECKING:
    from kbridge.arch import Arch
    from kbridge.images.image import Image
    from kbridge.session import Session
    from kbridge.spec import ProbeSpec
    from kbridge.workload import Workload

NAMES = ("kmod", "tracefs", "bpf")


class ArmFn(Protocol):
    def __call__(self, session: Session, spec: ProbeSpec, prepared: object = None) -> AbstractContextManager[Armed]: ...


@dataclass(frozen=True)
class Mechanism:
    """One mechanism: what it needs, what it refuses offline, how it arms a probe.

    check(spec, arch): refusals knowable before any VM boots (raises KbridgeError).
    prepare(spec, image): work that can start while the guest boots (the module build);
      its result is passed to arm() as `prepared`. None: nothing to prepare.
    arm(session, spec, prepared): the probe as the engine's Armed context manager: armed when
      entered, disarmed when left, the guest as it was found, whatever happens.
    """

    name: str
    flavour: str  # the image flavour it needs ("bcc" for eBPF)
    check: Callable[[ProbeSpec, Arch], None]
    prepare: Callable[[ProbeSpec, Image], object] | None
    arm: ArmFn
    # What prepare() would return when that costs nothing (built before), else None: no thread for it.
    ready: Callable[[ProbeSpec, Image], object] | None = None

    def run(
        self,
        session: Session,
        spec: ProbeSpec,
        workload: Workload,
        stop: StopRule = StopRule(),
        on_hit: HitSink | None = None,
        prepared: object = None,
    ) -> MechanismResult:
        """Arm SPEC in the session's guest, run WORKLOAD, collect every hit, disarm (kbridge.mechanisms.engine)."""
        return drive(self.name, session.target, spec, workload, stop, on_hit, self.arm(session, spec, prepared))


def get(name: str) -> Mechanism:
    """The mechanism NAME (kmod, tracefs or bpf), imported on first use."""
    if name not in NAMES:
        raise KbridgeError(f"unknown mechanism {name!r}", f"use one of: {', '.join(NAMES)}")
    mech: Mechanism = importlib.import_module(f"kbridge.mechanisms.{name}").MECHANISM
    return mech
