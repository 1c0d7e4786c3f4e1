"""One QEMU process and its run directory: started, watched through its console log, stopped.

QemuVM (vm.py) is the Target built on it; this module knows the process and the files QEMU
writes (console.log, qemu.log, the agent and QMP sockets), not what the guest is used for.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

from kbridge import crashes, procs
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.targets.base import GuestCrash, GuestIOError
from kbridge.targets.qemu.agent import GuestAgent
from kbridge.targets.qemu.argv import spawn_prefix


def spawn(argv: list[str], rundir: Path, keep: bool, state: Path | None) -> procs.Process:
    """Start QEMU with ARGV in a fresh RUNDIR, booting, or restoring the saved guest STATE."""
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    from kbridge.targets.qemu import snapshot  # QMP (asyncio): only to boot, save or restore

    if state is not None:
        argv = [*argv, *snapshot.restore_args(state)]
    # A session of its own: Ctrl-C at the terminal reaches kbridge, which stops the
    # VM itself, instead of killing QEMU first (the guest would look crashed).
    with open(rundir / "qemu.log", "wb") as log:
        popen = subprocess.Popen(
            [*spawn_prefix(keep), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return procs.Process(popen.pid)


class QemuProcess:
    """The QEMU process PROC of the ARCH guest in RUNDIR, as this kbridge process found it."""

    def __init__(self, rundir: Path, arch: Arch, proc: procs.Process) -> None:
        self.rundir = rundir
        self.arch = arch
        self.proc = proc
        # What the console held when this process took the VM: an older report is not this command's.
        self.console_mark = self.log_mark()

    def console(self, since: int = 0) -> str:
        """The console log from byte SINCE on."""
        try:
            with open(self.rundir / "console.log", "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = (self.rundir / "console.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_mark(self) -> int:
        """The console log's size now: the kernel prints its reports there (loglevel=5: warnings too)."""
        try:
            return (self.rundir / "console.log").stat().st_size
        except OSError:
            return 0

    def check(self) -> None:
        """Raise GuestCrash if QEMU is gone after a panic, KbridgeError if it is gone otherwise."""
        if self.proc.is_running() and not self.proc.is_zombie():
            return
        console = self.console(self.console_mark)
        if (report := crashes.find(console)) is not None:
            raise GuestCrash(f"the {self.arch.name} guest kernel panicked", report)
        qlog = (self.rundir / "qemu.log").read_text(errors="replace") if (self.rundir / "qemu.log").exists() else ""
        raise KbridgeError(f"QEMU exited unexpectedly: {qlog.strip()[-500:] or console[-500:]}")

    def connect(self, timeout: float) -> GuestAgent:
        """The guest agent, once it answers (a booting guest: within TIMEOUT s)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            try:
                return GuestAgent(str(self.rundir / "qga.sock"), timeout=min(1.0, deadline - time.monotonic()))
            except GuestIOError:
                if time.monotonic() > deadline:
                    raise GuestIOError(
                        f"the {self.arch.name} guest did not come up within {timeout:.0f} s; "
                        f"console: {self.console_tail()!r}"
                    ) from None

    def resume(self, deadline: float) -> GuestAgent:
        """A restored guest: run it, reconnect the agent, and set its clock (it stopped at the save)."""
        from kbridge.targets.qemu import snapshot

        qmp = snapshot.wait_restored(self.rundir / "qmp.sock", deadline)
        qmp.close()
        while True:
            self.check()
            try:
                # The agent misses syncs sent while the restored guest settles: resend every 20 ms.
                agent = GuestAgent(
                    str(self.rundir / "qga.sock"), timeout=max(0.05, deadline - time.monotonic()), retry_s=0.02
                )
                break
            except GuestIOError:
                if time.monotonic() > deadline:
                    raise
        agent.call("guest-set-time", time=time.time_ns())
        return agent

    def stop(self) -> None:
        """Stop QEMU (QMP quit, then SIGKILL if it lingers) and remove its directory."""
        if self.proc.is_running():
            with contextlib.suppress(Exception):
                from kbridge.targets.qemu.qmp import Qmp  # asyncio: only to stop or save a VM

                qmp = Qmp(str(self.rundir / "qmp.sock"), timeout=2.0)
                # Wait for quit's reply before closing, or QEMU may miss the command.
                qmp.execute("quit", timeout=5.0)
                qmp.close()
            if not self.proc.wait(timeout=5):
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.rundir, ignore_errors=True)
