"""What every lab check does in the guest: watch the kernel log for an oops, run the workload.

Everything goes through the Target protocol (kbridge.targets.base.Target).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NoReturn

from kbridge import oops
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.labs.grading import StepTimeout, StudentCrash
from kbridge.paths import cache_dir
from kbridge.targets import ownership
from kbridge.targets.base import GuestIOError, Target

GUEST_DIR = "/tmp/kblab"
WORKLOAD = f"{GUEST_DIR}/kblab"  # its comm is "kblab": the labs' filters select it
WORKLOAD_COMM = "kblab"
FLOOD_LINES = 5000  # lines in one read of the log past which it is a flood, not output to wait for
DATA = Path(__file__).resolve().parent / "data"


class LogWatch:
    """The guest's kernel log from a marker on: what the student's module printed, and any oops."""

    def __init__(self, target: Target, timeout: float = 30.0) -> None:
        self.target = target
        self.stream = target.kmsg()
        self.lines: list[str] = []
        token = secrets.token_hex(4)
        target.run(["/bin/sh", "-c", f"echo kblab-start-{token} > /dev/kmsg"], timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = next(self.stream)
            if rec is not None and rec.text.endswith(f"kblab-start-{token}"):
                return
        raise KbridgeError(
            "the guest's kernel log did not reach the host (no start marker)",
            "kbridge doctor checks the guest's stream ports",
        )

    def poll(self, quiet: float = 0.3, limit: float = 10.0) -> list[str]:
        """Read the log until QUIET s pass without a record (at most LIMIT s); StudentCrash on an oops."""
        new: list[str] = []
        start = last = time.monotonic()
        deadline = start + limit
        crashed = False
        while time.monotonic() < deadline:
            rec = next(self.stream)
            now = time.monotonic()
            if len(new) > FLOOD_LINES and now - start > 2.0 and not crashed:
                break  # a log that never goes quiet (a handler printing for every call): enough read
            if rec is None:
                if now - last >= (1.5 if crashed else quiet):
                    break
                continue
            last = now
            if not rec.from_kernel and not rec.text.startswith("kblab-"):
                continue  # written to /dev/kmsg from user space: not what the kernel (or a module) said
            new.append(rec.text)
            if oops.is_oops(rec.text):
                crashed = True
        self.lines += new
        if crashed:
            start = next(i for i, t in enumerate(self.lines) if oops.is_oops(t))
            raise StudentCrash("the guest kernel oopsed", "\n".join(self.lines[max(0, start - 2) : start + 40]))
        return new

    def mine(self, module: str) -> list[str]:
        """Lines the module printed (pr_fmt prefix "MODULE: ")."""
        return [t for t in self.lines if t.startswith(f"{module}: ")]


def _oops_lines(console: str) -> set[str]:
    return {ln for ln in console.splitlines() if oops.is_oops(ln)}


def guest_run(
    target: Target, argv: list[str], log: LogWatch | None = None, timeout: float = 60.0, what: str | None = None
) -> tuple[int, str]:
    """Run ARGV in the guest; (exit code, output). An oops or a hung guest becomes StudentCrash; a
    command that does not finish within TIMEOUT s in a guest that still answers becomes StepTimeout
    (it is killed, and the guest is kept). WHAT names the command in messages (default: ARGV).

    The guest's console is watched on the host while ARGV runs: an oops that takes the guest's
    agent or log streamer down with it (a kprobe calling freed handlers hits them first) is
    reported at once, instead of after the agent's own timeout.
    """
    what = what or " ".join(argv)
    seen = _oops_lines(target.console_tail(400))
    t0 = time.monotonic()
    proc: ownership.OwnedProcess | None = None
    try:
        proc = ownership.spawn(target, argv)  # owned: a check killed now leaves nothing running
        while True:
            _raise_on_oops(target, log, seen)
            res = proc.poll()
            if res is not None:
                break
            if time.monotonic() - t0 > timeout:
                break
            time.sleep(0.05)
    except GuestIOError:
        _hung(target, log, what, t0, proc)
    if res is None:  # still running at the deadline
        assert proc is not None
        elapsed = time.monotonic() - t0
        try:
            proc.stop()
            alive = target.run(["/bin/busybox", "true"], timeout=10).ok
        except GuestIOError:
            alive = False
        if not alive:
            _hung(target, log, what, t0, None)
        if log is not None:
            log.poll(quiet=0.5)  # an oops explains it better than the timeout does
        raise StepTimeout(what, timeout, elapsed, stuck=proc.result is None)
    if res.signal in _CRASH_SIGNALS:
        # Killed by the kernel (an oops in its system call kills it): the report may still be on its
        # way to the console; wait for it before blaming the program.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            _raise_on_oops(target, log, seen)
            time.sleep(0.2)
    if log is not None:
        log.poll()
    output = (res.stdout + res.stderr).decode(errors="replace")
    if res.signal:
        return 128 + res.signal, f"{output}(killed by signal {res.signal})"
    return res.exitcode, output


_CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGKILL, signal.SIGBUS, signal.SIGILL, signal.SIGTRAP)


def _raise_on_oops(target: Target, log: LogWatch | None, seen: set[str]) -> None:
    """StudentCrash with the whole report if the console shows an oops line not in SEEN."""
    if not _oops_lines(target.console_tail(400)) - seen:
        return
    # The report is still being printed: wait until the console has been quiet for a second.
    size, quiet_since, deadline = len(target.console_tail(400)), time.monotonic(), time.monotonic() + 8.0
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 1.0:
        time.sleep(0.2)
        if (now := len(target.console_tail(400))) != size:
            size, quiet_since = now, time.monotonic()
    if log is not None:
        with contextlib.suppress(StudentCrash, KbridgeError):
            log.poll(quiet=0.5, limit=3.0)
    raise StudentCrash("the guest kernel oopsed", _console_oops(target.console_tail(200), seen))


def _hung(target: Target, log: LogWatch | None, what: str, t0: float, proc: ownership.OwnedProcess | None) -> NoReturn:
    """The guest stopped answering while WHAT ran: an oops explains it, else the guest hung."""
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)
    target.check_alive()  # GuestCrash if the console shows an oops or QEMU is gone
    if log is not None:
        with contextlib.suppress(KbridgeError):
            log.poll(quiet=1.0, limit=3.0)  # StudentCrash on an oops
    elapsed = time.monotonic() - t0
    raise StudentCrash(
        f"the guest kernel stopped answering while {what} ran (after {elapsed:.0f} s): it hung",
        target.console_tail(40),
    )


def _console_oops(console: str, seen: set[str] | frozenset[str] = frozenset()) -> str:
    """The console from the first new oops line on (what the kernel said about the crash)."""
    lines = console.splitlines()
    first = next((i for i, ln in enumerate(lines) if oops.is_oops(ln) and ln not in seen), 0)
    return "\n".join(lines[max(0, first - 2) : first + 60])


def workload_binary(arch: Arch) -> Path:
    """kblab for ARCH, built on the host with -nostdlib (cached by source and arch)."""
    src = DATA / "kblab.c"
    text = src.read_bytes()
    out = cache_dir() / "labs" / f"kblab-{arch.name}-{hashlib.sha256(text).hexdigest()[:12]}"
    if out.is_file():
        return out
    cc = f"{arch.cross_compile()}gcc-12"
    if shutil.which(cc) is None:
        raise KbridgeError(f"cannot build the lab workload: {cc} not found", "kbridge doctor --fix installs it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    proc = subprocess.run(
        [
            cc,
            "-static",
            "-nostdlib",
            "-fno-pic",
            "-no-pie",
            "-O2",
            "-fno-stack-protector",
            "-fno-builtin",
            "-ffreestanding",
            "-o",
            str(tmp),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise KbridgeError(f"building the lab workload failed: {proc.stderr.strip()[-1000:]}")
    tmp.rename(out)
    return out


def install_workload(target: Target) -> None:
    """Put kblab into the guest at WORKLOAD."""
    target.run(["/bin/busybox", "mkdir", "-p", GUEST_DIR], timeout=30)
    target.write_file(WORKLOAD, workload_binary(target.arch).read_bytes())
    res = target.run(["/bin/busybox", "chmod", "755", WORKLOAD], timeout=30)
    if not res.ok:
        raise KbridgeError(f"could not install the lab workload in the guest: {res.stderr.decode(errors='replace')}")


def cleanup_guest_dir(target: Target) -> None:
    target.run(["/bin/busybox", "rm", "-rf", GUEST_DIR], timeout=30)
