"""What every target offers the layers above it: run, move files, stream the kernel log."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kbridge.arch import Arch
from kbridge.errors import KbridgeError

if TYPE_CHECKING:
    from kbridge.crashes import Crash
    from kbridge.images.image import Image


class GuestIOError(KbridgeError):
    """The guest did not answer as expected: a command, a file operation or a stream failed.

    Every target raises it for its own channel's failures (the guest agent, SSH), so the
    layers above never see how the guest is reached.
    """


@dataclass
class ExecResult:
    """A finished guest command."""

    exitcode: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.signal is None

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class GuestCrash(KbridgeError):
    """The guest kernel reported a crash (an oops, a panic, a BUG, a WARN, an RCU stall) or a bug
    checker's report (KASAN, KFENCE, UBSAN, lockdep, sleeping in atomic context); `text` holds what
    it printed, `crash` what kbridge makes of it (the blamed frame, the source line, the file the
    whole report was saved to), once a target attached it. FATAL: the VM is restarted before the
    next command (the kernel cannot be trusted, or its checker is off); else it is kept."""

    def __init__(
        self, message: str, text: str, crash: Crash | None = None, fatal: bool = True, why: str | None = None
    ) -> None:
        if fatal:
            hint = (
                f"{why}: the VM is restarted by the next kbridge command"
                if why
                else ("the VM is restarted by the next kbridge command")
            )
        else:
            hint = "the kernel went on: the VM is kept"
        super().__init__(message, hint)
        self.text = text
        self.crash = crash
        self.fatal = fatal


@dataclass(frozen=True)
class KmsgRecord:
    """One /dev/kmsg record: 'PRIORITY,SEQ,USEC,FLAGS;TEXT' (priority = facility << 3 | level)."""

    level: int
    seq: int
    usec: int
    text: str
    facility: int = 0

    @property
    def from_kernel(self) -> bool:
        """Whether the kernel logged it: devkmsg_write() gives user space's records LOG_USER (1)
        or the facility they ask for, never 0, precisely so that they can be told apart."""
        return self.facility == 0


_KMSG = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;(.*)$")


def parse_kmsg(line: str) -> KmsgRecord | None:
    """Parse a /dev/kmsg line; continuation lines (' KEY=VALUE') give None."""
    m = _KMSG.match(line)
    if not m:
        return None
    prio, seq, usec, text = m.groups()
    # /dev/kmsg escapes non-printable bytes as \xNN; undo it for the text we show.
    text = re.sub(r"\\x([0-9a-f]{2})", lambda x: chr(int(x.group(1), 16)), text)
    return KmsgRecord(int(prio) & 7, int(seq), int(usec), text, int(prio) >> 3)


class KmsgRecords:
    """Parsed /dev/kmsg records over a stream of its lines (None when idle); continuation lines skipped.

    An iterator object rather than a generator: an exception (Ctrl-C) raised while it
    waits leaves it usable, so cleanup can keep reading.
    """

    def __init__(self, lines: Iterator[str | None]) -> None:
        self.lines = lines

    def __iter__(self) -> KmsgRecords:
        return self

    def __next__(self) -> KmsgRecord | None:
        while True:
            line = next(self.lines)
            if line is None:
                return None
            if rec := parse_kmsg(line):
                return rec


class LineStream(Protocol):
    """Lines from a guest program, as they arrive; None after `idle` seconds without one."""

    idle: float

    def __iter__(self) -> LineStream: ...
    def __next__(self) -> str | None: ...


class Target(Protocol):
    """A running guest kernel kbridge can drive: the only view mechanisms, collectors,
    `inspect` and sessions have of a guest (the embedded QEMU VM, a Vagrant machine).

    Guest commands are argv lists (no shell unless the argv says /bin/sh -c). A guest
    has busybox at /bin/busybox and kbridge's helpers under /usr/lib/kbridge.
    """

    name: str  # how the user names it: "qemu:x86_64", "vagrant:kbridge-arm64"
    arch: Arch
    krel: str  # `uname -r` in the guest
    accel: str  # "kvm", "tcg", or what the provider says
    flavour: str  # "default" | "bcc": whether bcc_python() can run eBPF programs
    image: Image  # the kernel's headers (module builds) and the per-kernel fact cache (state)
    kept: bool  # outlives this command (kbridge vm up, a Vagrant machine)
    # Whether a tracefs run may arm in one guest command (kbridge/guest/tracefs.sh) rather than one
    # file operation per round trip.
    scripted_tracefs: bool

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float | None = 120) -> ExecResult:
        """Run ARGV as root in the guest and wait for it."""

    def spawn(self, argv: list[str], stdin: bytes | None = None) -> int:
        """Start ARGV as root in the guest; a handle for poll()/wait()."""

    def poll(self, pid: int) -> ExecResult | None:
        """The result of a spawned command, or None while it runs."""

    def wait(self, pid: int, timeout: float | None = None) -> ExecResult:
        """Wait for a spawned command (KbridgeError after TIMEOUT s)."""

    def guest_pid(self, handle: int) -> int:
        """The guest tgid of a spawned command (for kill and for pid filters)."""

    def plumbing_pids(self) -> list[int]:
        """tgids of the target's own guest-side helpers (agent, log reader, SSH session): never probed."""

    def describe(self) -> dict:
        """What a status listing shows of it (arch, kernel, accel, and the target's own facts)."""

    def write_file(self, path: str, data: bytes, mode: str = "w") -> None:
        """Write DATA to PATH; mode "a" appends (kprobe_events without clearing it)."""

    def read_file(self, path: str) -> bytes:
        """The bytes of PATH in the guest."""

    def read_chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        """The bytes of PATH, SIZE at a time (a large file never sits in memory whole)."""

    def kmsg(self, idle: float = 0.05) -> Iterator[KmsgRecord | None]:
        """Kernel log records as they arrive (a fresh stream replays the backlog first)."""

    def stream(self, port: str, idle: float = 0.05) -> LineStream:
        """The host end of stream PORT (one of STREAM_PORTS), opened before the guest writes."""

    def stream_path(self, port: str) -> str:
        """The guest path a program writes to so its lines arrive on stream PORT."""

    def close_stream(self, port: str) -> None:
        """Close the host end of stream PORT."""

    def bcc_python(self) -> list[str] | None:
        """The argv prefix that runs a python3 with bcc in the guest, or None without bcc."""

    def bcc_missing(self) -> KbridgeError:
        """What --via bpf says when bcc_python() is None: the steps that give this guest bcc."""

    def check_alive(self) -> None:
        """Raise GuestCrash if the guest panicked or oopsed."""

    def mark_crashed(self, report: Path | None = None) -> None:
        """The guest oopsed (REPORT: the saved crash): the next command must not reuse it as it is."""

    def crashed(self) -> bool:
        """Whether it was marked crashed (an oops, or a module load that never returned)."""

    def console_tail(self, lines: int = 40) -> str:
        """The end of the guest's console output (crash reports)."""

    def log_mark(self) -> int:
        """A mark in the guest kernel's log: crash_since(mark) reads what it reported after it."""

    def crash_since(self, mark: int) -> str | None:
        """The first crash report (oops, panic, BUG, WARN, RCU stall) the kernel printed after MARK."""

    def host_state(self) -> Path:
        """A host directory for what kbridge remembers about this guest (the user's modules loaded)."""

    def release(self) -> None:
        """Done with it: an ephemeral VM is shut down, a kept one is left running."""


# Guest -> host line streams a mechanism can point a guest program at.
TRACE_PORT = "org.kbridge.trace"
BPF_PORT = "org.kbridge.bpf"
STREAM_PORTS = (TRACE_PORT, BPF_PORT)
