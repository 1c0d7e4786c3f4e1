"""kbridge: drive real kprobes in real Linux kernels (kernel modules, tracefs, eBPF) in QEMU or Vagrant guests.

import kbridge

with kbridge.vm(arch="x86_64") as vm:
    run = vm.probe("ksys_write", pre=True, args={"count": 3}, run="echo hi > /tmp/x")
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: `kbridge --help` imports nothing it does not print
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.2.0"
__all__ = ["Guest", "GuestCrash", "KbridgeError", "vm"]

if TYPE_CHECKING:
    from kbridge.api import Guest, vm
    from kbridge.errors import KbridgeError
    from kbridge.targets.base import GuestCrash


def __getattr__(name: str) -> Any:
    # Imported on first use: `kbridge --help` and `import kbridge.spec` stay light.
    if name == "KbridgeError":
        from kbridge.errors import KbridgeError

        return KbridgeError
    if name == "GuestCrash":
        from kbridge.targets.base import GuestCrash

        return GuestCrash
    if name in __all__:
        from kbridge import api

        return getattr(api, name)
    raise AttributeError(f"module 'kbridge' has no attribute {name!r}")
