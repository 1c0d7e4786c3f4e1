"""The three ways to drive a kprobe, each from a ProbeSpec to a MechanismResult.

kmod: a generated kernel module; tracefs: kprobe_events; bpf: bcc in the guest.
tracefs and bpf share one signature, `run(session, spec, workload, stop, on_hit)`;
kmod also takes the built module (see kbridge.probe, which builds it during boot).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kbridge.errors import KbridgeError

NAMES = ("kmod", "tracefs", "bpf")


def mechanism(name: str) -> Callable:
    """The run() of the tracefs or bpf mechanism, imported on first use."""
    if name not in ("tracefs", "bpf"):
        raise KbridgeError(f"unknown mechanism {name!r}", f"use one of: {', '.join(NAMES)}")
    return importlib.import_module(f"kbridge.mechanisms.{name}").run  # type: ignore[no-any-return]
