"""What every target offers the layers above it: run, move files, stream the kernel log."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.targets.qga import ExecResult


class GuestCrash(KbridgeError):
    """The guest kernel oopsed or panicked; `text` holds what it printed."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message, "the VM is restarted by the next kbridge command")
        self.text = text


@dataclass(frozen=True)
class KmsgRecord:
    """One /dev/kmsg record: 'LEVEL,SEQ,USEC,FLAGS;TEXT'."""

    level: int
    seq: int
    usec: int
    text: str


_KMSG = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;(.*)$")


def parse_kmsg(line: str) -> KmsgRecord | None:
    """Parse a /dev/kmsg line; continuation lines (' KEY=VALUE') give None."""
    m = _KMSG.match(line)
    if not m:
        return None
    prio, seq, usec, text = m.groups()
    # /dev/kmsg escapes non-printable bytes as \xNN; undo it for the text we show.
    text = re.sub(r"\\x([0-9a-f]{2})", lambda x: chr(int(x.group(1), 16)), text)
    return KmsgRecord(int(prio) & 7, int(seq), int(usec), text)


OOPS_MARKERS = ("Oops", "BUG: ", "Kernel panic", "general protection fault",
                "Unable to handle kernel", "Internal error:", "WARNING: CPU:")


class Target(Protocol):
    """A running guest kernel kbridge can drive."""

    arch: Arch
    krel: str
    accel: str

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float | None = 120) -> ExecResult: ...
    def spawn(self, argv: list[str], stdin: bytes | None = None) -> int: ...
    def poll(self, pid: int) -> ExecResult | None: ...
    def write_file(self, path: str, data: bytes) -> None: ...
    def read_file(self, path: str) -> bytes: ...
    def kmsg(self) -> Iterator[KmsgRecord | None]: ...
    def check_alive(self) -> None: ...
