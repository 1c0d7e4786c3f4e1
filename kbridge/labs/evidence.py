"""What a checker learns from the kernel itself, never from the student's code: a count of calls
made by its own kprobe, the live address of a symbol, kprobe events of other tools.

A submission can print or store any number it likes; these it cannot forge. The checker's probe
is a kprobe event of its own (a random group) on the same symbol, filtered on the workload's comm
and recorded in a tracing instance of its own, so the top-level trace buffer and the student's
events are not touched.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from kbridge.errors import KbridgeError
from kbridge.targets.base import GuestIOError, Target

TRACING = "/sys/kernel/tracing"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def live_address(target: Target, symbol: str) -> int | None:
    """SYMBOL's address in the running kernel (/proc/kallsyms, read as root: this boot's, after KASLR)."""
    if not _NAME.fullmatch(symbol):
        raise KbridgeError(f"not a symbol name: {symbol!r}")
    res = target.run(["/bin/busybox", "awk", f'$3 == "{symbol}" {{ print $1; exit }}', "/proc/kallsyms"], timeout=60)
    text = res.stdout.decode(errors="replace").strip()
    try:
        return int(text, 16) if res.ok and text else None
    except ValueError:
        return None


@dataclass
class CallCount:
    """Calls to a symbol by tasks named COMM, counted by the checker's own kprobe event."""

    target: Target
    symbol: str
    comm: str
    group: str = ""
    counted: int | None = None

    @property
    def instance(self) -> str:
        return f"{TRACING}/instances/{self.group}"

    def _events(self) -> str:
        return f"{self.instance}/events/{self.group}/calls"

    def start(self) -> None:
        for name in (self.symbol, self.comm):
            if not _NAME.fullmatch(name):
                raise KbridgeError(f"not a name the checker probes: {name!r}")
        self.group = f"kbcheck_{secrets.token_hex(4)}"
        t = self.target
        t.write_file(f"{TRACING}/kprobe_events", f"p:{self.group}/calls {self.symbol}\n".encode(), mode="a")
        t.run(["/bin/busybox", "mkdir", self.instance], timeout=30)
        t.write_file(f"{self._events()}/filter", f'comm == "{self.comm}"\n'.encode())
        t.write_file(f"{self._events()}/enable", b"1")

    def stop(self) -> int:
        """Disable the probe; the calls it counted (also kept in `counted`)."""
        t = self.target
        t.write_file(f"{self._events()}/enable", b"0")
        text = t.read_file(f"{self.instance}/trace").decode(errors="replace")
        self.counted = sum(1 for line in text.splitlines() if " calls: (" in line)
        return self.counted

    def remove(self) -> None:
        """Leave nothing of it (best effort: also run after a failed check)."""
        if not self.group:
            return
        t = self.target
        with contextlib.suppress(KbridgeError):
            t.write_file(f"{self._events()}/enable", b"0")
        with contextlib.suppress(KbridgeError):
            t.run(["/bin/busybox", "rmdir", self.instance], timeout=30)
        with contextlib.suppress(KbridgeError):
            t.write_file(f"{TRACING}/kprobe_events", f"-:{self.group}/calls\n".encode(), mode="a")
        self.group = ""


@contextlib.contextmanager
def counting(target: Target, symbol: str, comm: str) -> Iterator[CallCount]:
    """Count calls of SYMBOL by COMM while the block runs (`counted` once it ended)."""
    count = CallCount(target, symbol, comm)
    try:
        count.start()
        yield count
        count.stop()
    finally:
        count.remove()


@dataclass(frozen=True)
class OtherEvent:
    """A kprobe event another tool defined: the student's steps must leave it as it is."""

    line: str  # as written to kprobe_events
    shown: str  # as kprobe_events shows it back


def define_others(target: Target) -> list[OtherEvent]:
    """Define kprobe events as other tools would (names the student cannot know in advance), one in
    the default group as `perf probe`-style tools leave them, one in a group of its own."""
    tag = secrets.token_hex(3)
    wanted = [
        (f"p:kprobes/other_{tag} vfs_read", f"p:kprobes/other_{tag} vfs_read"),
        (f"r:tool_{tag}/write_ret ksys_write ret=$retval", f"r0:tool_{tag}/write_ret ksys_write ret=$retval"),
    ]
    out = []
    for line, shown in wanted:
        target.write_file(f"{TRACING}/kprobe_events", (line + "\n").encode(), mode="a")
        out.append(OtherEvent(line, shown))
    return out


def missing_others(text: str, others: list[OtherEvent]) -> list[OtherEvent]:
    """The events of OTHERS that kprobe_events (TEXT) no longer holds."""
    have = {_key(ln) for ln in text.splitlines()}
    return [o for o in others if _key(o.shown) not in have]


def _key(line: str) -> str:
    """An event line as the kernel shows it, without what differs between versions (r0: vs r:)."""
    parts = line.split()
    if not parts:
        return ""
    head = re.sub(r"^([pr])\d*:", r"\1:", parts[0])
    return " ".join([head, *parts[1:]])


def remove_others(target: Target, others: list[OtherEvent]) -> None:
    for o in others:
        name = o.line.split()[0].split(":", 1)[1]
        with contextlib.suppress(GuestIOError, KbridgeError):
            target.write_file(f"{TRACING}/kprobe_events", f"-:{name}\n".encode(), mode="a")
