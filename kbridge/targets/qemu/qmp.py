"""QMP, QEMU's own control channel, through the QEMU project's qemu.qmp library."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kbridge.targets.base import GuestIOError


class Qmp:
    """A negotiated QMP session with one QEMU process: execute() commands, errors as GuestIOError."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol  # asyncio underneath: imported only when used

        deadline = time.monotonic() + timeout
        while True:
            self._qmp = QEMUMonitorProtocol(str(path))
            try:
                self._qmp.connect(negotiate=True)
                break
            except Exception as e:  # noqa: BLE001 - qemu.qmp raises its own and OS errors alike
                self.close()
                if time.monotonic() > deadline:
                    raise GuestIOError(f"no QMP answer on {path}: {e}") from None
                time.sleep(0.02)
        self.path = path

    def execute(self, command: str, timeout: float = 10.0, **arguments: object) -> Any:
        """Run COMMAND; its "return" value."""
        self._qmp.settimeout(timeout)
        try:
            return self._qmp.cmd(command, **arguments)
        except Exception as e:  # noqa: BLE001 - ExecuteError, timeouts and a closed socket alike
            raise GuestIOError(f"QMP {command}: {e}") from None

    def close(self) -> None:
        # qemu.qmp's disconnect re-raises the CancelledError of its reader task (a BaseException)
        # when QEMU closed the socket first: closing is done either way.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            self._qmp.close()


@contextlib.contextmanager
def session(path: Path | str, timeout: float = 10.0) -> Iterator[Qmp]:
    """A QMP session for the block."""
    qmp = Qmp(path, timeout)
    try:
        yield qmp
    finally:
        qmp.close()
