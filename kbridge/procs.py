"""Host processes by pid and start time, read from /proc: what kbridge asks psutil on every command
(is the owner of a record alive, is this QEMU still the one recorded), without importing psutil.

start_time() is psutil's create_time() on Linux, to the bit (the boot time from /proc/stat plus the
process's start in clock ticks), so records written with either compare equal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_boot_time: float | None = None


def _btime() -> float:
    global _boot_time
    if _boot_time is None:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime"):
                    _boot_time = float(line.split()[1])
                    break
            else:
                raise OSError("no btime in /proc/stat")
    return _boot_time


def _stat(pid: int) -> list[bytes] | None:
    """/proc/PID/stat's fields after the command name (state first), or None when PID is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()  # the name may hold spaces and parentheses


def start_time(pid: int) -> float | None:
    """When PID started, in seconds since the epoch (psutil's create_time()); None when it is gone."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19]) / _CLK_TCK + _btime()


def alive(pid: int, start: float | None = None, tolerance: float = 0.01) -> bool:
    """Whether PID runs (not a zombie) and, given START, is the process that started then."""
    fields = _stat(pid)
    if fields is None or fields[0] == b"Z":
        return False
    return start is None or abs(int(fields[19]) / _CLK_TCK + _btime() - start) < tolerance


class Process:
    """One host process, pinned by its start time (a reused pid is another process)."""

    def __init__(self, pid: int, start: float | None = None) -> None:
        self.pid = pid
        found = start_time(pid) if start is None else start
        if found is None:
            raise ProcessLookupError(pid)
        self.start = found

    def is_running(self) -> bool:
        """It runs, or has exited and was not reaped yet (psutil's is_running())."""
        t = start_time(self.pid)
        return t is not None and abs(t - self.start) < 0.01

    def is_zombie(self) -> bool:
        fields = _stat(self.pid)
        return fields is not None and fields[0] == b"Z"

    def wait(self, timeout: float) -> bool:
        """Wait up to TIMEOUT s for it to end (reaped if it is this process's child); whether it did."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ChildProcessError, OSError):
                if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                    return True
            if not self.is_running() or (self.is_zombie() and not self._mine()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def _mine(self) -> bool:
        fields = _stat(self.pid)
        return fields is not None and int(fields[1]) == os.getpid()

    def kill(self) -> None:
        if self.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
