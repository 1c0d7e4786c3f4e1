"""What kbridge puts in a guest, and which kbridge process owns it.

Every module kbridge loads, kprobe event it defines and helper process it
starts (a trace_pipe reader, the bcc runner, the workload) is recorded in the
guest in /run/kbridge/owned.log, with the host process that owns it (pid and
start time, so a reused pid is never mistaken for the owner). A kbridge killed
with SIGKILL cannot clean up after itself; the next command on that guest
reclaims what a dead owner left before it does anything else, and says so.

Records live in the guest's /run (a tmpfs): a rebooted guest has none, and
nothing of an earlier boot survives there either. The ledger is one append-only
file ("+" JSON when claimed, "-" KEY when released): claiming, releasing and
listing are a few agent calls each, with no guest program started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from kbridge.errors import KbridgeError
from kbridge.targets.base import Target

LEDGER = "/run/kbridge/owned.log"
COMPACT_AT = 256  # ledger lines past which reclaim() rewrites it with only the live records
KINDS = ("process", "event", "module")  # reclaimed in this order: stop readers before removing events
_NAME = re.compile(r"[A-Za-z0-9_.:/@-]{1,200}")


@dataclass(frozen=True)
class Record:
    """One thing in the guest and its owner on the host."""

    kind: str  # process | event | module
    name: str  # guest pid, GROUP/EVENT, or module name
    owner: int
    owner_start: float

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.name.replace('/', '+')}"

    def owner_alive(self) -> bool:
        try:
            p = psutil.Process(self.owner)
            return abs(p.create_time() - self.owner_start) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def _me() -> tuple[int, float]:
    return os.getpid(), psutil.Process().create_time()


def claim(target: Target, kind: str, name: str) -> Record:
    """Record that this kbridge process owns NAME (of KIND) in TARGET's guest."""
    if kind not in KINDS or not _NAME.fullmatch(name):
        raise ValueError(f"bad ownership record {kind!r} {name!r}")
    pid, start = _me()
    rec = Record(kind, name, pid, start)
    line = f"+{json.dumps(rec.__dict__)}\n".encode()
    try:
        target.write_file(LEDGER, line, mode="a")
    except KbridgeError:  # a guest without /run/kbridge (not kbridge's init)
        target.run(["/bin/busybox", "mkdir", "-p", LEDGER.rsplit("/", 1)[0]], timeout=10)
        target.write_file(LEDGER, line, mode="a")
    return rec


def claim_process(target: Target, pid: int) -> Record:
    """claim() a guest process, by pid and start time (a pid reused later is not killed)."""
    return claim(target, "process", f"{pid}@{_start_time(target, pid)}")


def _start_time(target: Target, pid: int) -> str:
    try:
        stat = target.read_file(f"/proc/{pid}/stat").decode(errors="replace")
    except KbridgeError:
        return "0"  # already gone
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, starttime, counted after "pid (comm)"


def release(target: Target, rec: Record) -> None:
    """NAME is gone from the guest: forget it (best effort; a stale record is harmless)."""
    with contextlib.suppress(Exception):
        target.write_file(LEDGER, f"-{rec.key}\n".encode(), mode="a")


@contextlib.contextmanager
def owned(target: Target, kind: str, name: str) -> Iterator[Record]:
    """claim() for the block; release() after it, whatever happened."""
    rec = claim(target, kind, name)
    try:
        yield rec
    finally:
        release(target, rec)


def records(target: Target) -> list[Record]:
    """Every record in the guest (one file read)."""
    return list(_fold(_read(target)).values())


def _read(target: Target) -> list[str]:
    try:
        return target.read_file(LEDGER).decode(errors="replace").splitlines()
    except KbridgeError:
        return []  # nothing claimed in this guest yet


def _fold(lines: list[str]) -> dict[str, Record]:
    """The records claimed and not released, by key, in claim order."""
    live: dict[str, Record] = {}
    for line in lines:
        if line.startswith("-"):
            live.pop(line[1:], None)
            continue
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            d = json.loads(line[1:])
            rec = Record(d["kind"], str(d["name"]), int(d["owner"]), float(d["owner_start"]))
            live[rec.key] = rec
    return live


def reclaim(target: Target) -> list[str]:
    """Remove what dead kbridge processes left in the guest; what was done, one phrase each."""
    lines = _read(target)
    live = _fold(lines)
    dead = [r for r in live.values() if not r.owner_alive()]
    if not dead and len(lines) > COMPACT_AT:
        # Only live owners' records are kept; one command uses a kept VM at a time (its lock).
        with contextlib.suppress(Exception):
            target.write_file(LEDGER, "".join(f"+{json.dumps(r.__dict__)}\n" for r in live.values()).encode())
    done: list[str] = []
    for kind in KINDS:
        for rec in (r for r in dead if r.kind == kind):
            with contextlib.suppress(Exception):
                if what := _undo(target, rec):
                    done.append(what)
            release(target, rec)
    return done


def _undo(target: Target, rec: Record) -> str | None:
    if rec.kind == "process":
        pid, _, started = rec.name.partition("@")
        if _start_time(target, int(pid)) != started:
            return None  # gone, or the pid now belongs to another process
        res = target.run(["/bin/busybox", "kill", "-9", pid], timeout=10)
        return f"process {pid} stopped" if res.ok else None
    if rec.kind == "event":
        group, _, event = rec.name.partition("/")
        base = f"/sys/kernel/tracing/events/{group}/{event}"
        target.run(["/bin/sh", "-c", 'echo 0 > "$1/enable"; echo 0 > "$1/filter"', "kbridge-undo", base], timeout=10)
        target.write_file("/sys/kernel/tracing/kprobe_events", f"-:{group}/{event}\n".encode(), mode="a")
        return f"event {rec.name} removed"
    if rec.kind == "module":
        res = target.run(["/sbin/rmmod", rec.name], timeout=60)
        return f"module {rec.name} unloaded" if res.ok else None
    return None
