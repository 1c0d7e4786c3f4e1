"""What kbridge puts in a guest, and which kbridge process owns it.

Every module kbridge loads, kprobe event it defines and process it starts (a
workload, a trace_pipe reader, the eBPF runner, a lab's module) is recorded in the
guest in /run/kbridge/owned.log *before* it exists, with the host process that owns
it (pid and start time, so a reused pid is never mistaken for the owner). A kbridge
killed with SIGKILL cannot clean up after itself; the next command on that guest
reclaims what a dead owner left before it does anything else, and says so.

Processes are started through `spawn()`, in a session of their own (so a stop takes the
children too) and with KBRIDGE_OWNED=TAG in their environment, which every child inherits.
The record names TAG and is written before the spawn: a kill at any point leaves either
nothing started or processes whose environment names TAG, and reclaim() finds them all.

Records live in the guest's /run (a tmpfs): a rebooted guest has none. The ledger
is one append-only file ("+" JSON when claimed, "-" KEY when released). A claim costs no round trip
of its own when it goes with the command that makes the thing (recorded(): a process, a module);
releases wait for the next write to the ledger, or for flush() at the end of the command (a record
left by a killed kbridge is only reclaimed, which finds nothing to undo).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from kbridge import procs
from kbridge.errors import KbridgeError
from kbridge.targets.base import ExecResult, Target

LEDGER = "/run/kbridge/owned.log"
ARMING = "/run/kbridge/arming"  # the lock kbridge/guest/tracefs.sh holds while it arms a run
# Waits (at most 30 s) for ARMING ($1) to be free, or held by a process that is gone, then prints the
# ledger ($2; nothing when there is none yet).
_SETTLED = (
    'n=0; while [ -d "$1" ] && [ "$n" -lt 600 ]; do h=$(cat "$1/pid" 2>/dev/null); '
    'if [ -n "$h" ] && [ ! -d "/proc/$h" ]; then rm -rf "$1"; break; fi; n=$((n + 1)); sleep 0.05; done; '
    'cat "$2" 2>/dev/null; true'
)
# Under the ARMING lock ($1), replaces the ledger ($2) with stdin if it still has $3 bytes.
_COMPACT = (
    'mkdir "$1" 2>/dev/null || exit 0; echo $$ > "$1/pid"; '
    '[ "$(($(wc -c < "$2")))" -eq "$3" ] && cat > "$2.new" && mv "$2.new" "$2"; rm -rf "$1"'
)
COMPACT_AT = 256  # ledger lines past which reclaim() rewrites it with only the live records
KINDS = ("process", "event", "module")  # reclaimed in this order: stop readers before removing events
_NAME = re.compile(r"[A-Za-z0-9_.:/@-]{1,200}")
OWNER_VAR = "KBRIDGE_OWNED"
# Every process of a spawn() carries OWNER_VAR=TAG in its environment (children inherit it,
# exec keeps it): nothing is written on its behalf, so a probe counts none of kbridge's own work.
# TAG is [a-z0-9-] only, a literal as a grep pattern (busybox grep -F misses it in environ's NULs).
_RECLAIM = (
    'for f in $(grep -l -s "$1" /proc/[0-9]*/environ); do p=${f#/proc/}; p=${p%/environ}; '
    '[ "$p" != "$$" ] || continue; kill -9 -"$p" 2>/dev/null; kill -9 "$p" 2>/dev/null; echo "$p"; done; true'
)


@dataclass(frozen=True)
class Record:
    """One thing in the guest and its owner on the host."""

    kind: str  # process | event | module
    name: str  # a process's tag, GROUP/EVENT, or module name
    owner: int
    owner_start: float

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.name.replace('/', '+')}"

    def owner_alive(self) -> bool:
        return procs.alive(self.owner, self.owner_start)


def _me() -> tuple[int, float]:
    start = procs.start_time(os.getpid())
    assert start is not None  # this very process
    return os.getpid(), start


# Releases not written yet, per target: they go with the next write to its ledger, or flush().
_pending: weakref.WeakKeyDictionary[Target, list[str]] = weakref.WeakKeyDictionary()
# Appends $1 (ledger lines) to the ledger $2, then runs the rest of the arguments in its place (exec: the
# same pid): the record is in the ledger before what it records exists, in the same guest command.
# The append runs in a subshell: a write(2) by the pid that becomes the workload would be the
# workload's in a trace (ftrace shows each pid's latest comm, so even under the workload's name).
RECORDED = '(d=${2%/*}; [ -d "$d" ] || mkdir -p "$d"; printf "%s\\n" "$1" >> "$2") || exit 126; shift 2; exec "$@"'


def record(kind: str, name: str) -> tuple[Record, str]:
    """The record that this kbridge process owns NAME (of KIND), and its ledger line (nothing written)."""
    if kind not in KINDS or not _NAME.fullmatch(name):
        raise ValueError(f"bad ownership record {kind!r} {name!r}")
    pid, start = _me()
    rec = Record(kind, name, pid, start)
    return rec, f"+{json.dumps(rec.__dict__)}"


def take_pending(target: Target) -> list[str]:
    """The releases waiting for TARGET's ledger, for a guest command that appends them itself."""
    return _pending.pop(target, None) or []


def claim(target: Target, kind: str, name: str) -> Record:
    """Record that this kbridge process owns NAME (of KIND) in TARGET's guest: before it exists."""
    rec, line = record(kind, name)
    _append(target, [*take_pending(target), line])
    return rec


def recorded(target: Target, kind: str, name: str, argv: list[str]) -> tuple[Record, list[str]]:
    """ARGV, run so that it first appends the record of NAME (of KIND) to the ledger: claim() in the
    same guest command as what makes NAME (insmod, a process's exec)."""
    rec, line = record(kind, name)
    lines = "\n".join([*take_pending(target), line])
    return rec, ["/bin/busybox", "sh", "-c", RECORDED, "kbridge-own", lines, LEDGER, *argv]


def _append(target: Target, lines: list[str]) -> None:
    data = "".join(f"{ln}\n" for ln in lines).encode()
    try:
        target.write_file(LEDGER, data, mode="a")
    except KbridgeError:  # a guest without /run/kbridge yet (a machine kbridge did not build)
        target.run(["/bin/busybox", "mkdir", "-p", LEDGER.rsplit("/", 1)[0]], timeout=10)
        target.write_file(LEDGER, data, mode="a")


def release(target: Target, rec: Record) -> None:
    """NAME is gone from the guest: forget it, with the next write to the ledger (flush() at the latest)."""
    _pending.setdefault(target, []).append(f"-{rec.key}")


def flush(target: Target) -> None:
    """Write the releases still waiting (best effort: a stale record is harmless, reclaim finds nothing)."""
    if lines := take_pending(target):
        with contextlib.suppress(Exception):
            _append(target, lines)


@contextlib.contextmanager
def owned(target: Target, kind: str, name: str) -> Iterator[Record]:
    """claim() for the block; release() after it, whatever happened."""
    rec = claim(target, kind, name)
    try:
        yield rec
    finally:
        release(target, rec)


@dataclass(frozen=True)
class Reservation:
    """A process record made before its spawn(), written by the next guest command that writes the ledger."""

    tag: str
    record: Record
    line: str


def reserve(target: Target) -> Reservation:
    """The record of a process to spawn() after a probe is armed: the arming writes it to the ledger (its
    insmod, event or loader records carry the pending lines), so the process starts with no ledger write
    of its own, which the armed probe would count as the workload's."""
    tag = f"kb-{os.urandom(6).hex()}"
    rec, line = record("process", tag)
    _pending.setdefault(target, []).append(line)
    return Reservation(tag, rec, line)


def unreserve(target: Target, reserved: Reservation) -> None:
    """RESERVED will not be spawned: drop its record (pending, or written already)."""
    pending = _pending.get(target, [])
    if reserved.line in pending:
        pending.remove(reserved.line)
    else:
        release(target, reserved.record)


class OwnedProcess:
    """A guest process started by spawn(): recorded before it ran, stopped with its whole session."""

    def __init__(
        self, target: Target, argv: list[str], stdin: bytes | None = None, reserved: Reservation | None = None
    ) -> None:
        self.target = target
        self.tag = reserved.tag if reserved is not None else f"kb-{os.urandom(6).hex()}"
        # env, sh (recording it in the ledger) and setsid each exec the next program: the spawned pid is
        # ARGV's own, its session's. The agent's children are not process-group leaders: setsid does not fork.
        if reserved is not None:
            if reserved.line in _pending.get(target, []):
                # The arming wrote nothing to the ledger (a module kept loaded): the agent writes it, whose
                # own writes every mechanism leaves out, not a shell on its way to becoming the workload.
                _append(target, take_pending(target))
            rec, recording = reserved.record, ["/bin/busybox", "setsid", *argv]
        else:
            rec, recording = recorded(target, "process", self.tag, ["/bin/busybox", "setsid", *argv])
        self.record: Record | None = rec
        self.result: ExecResult | None = None
        try:
            self.handle = target.spawn(["/bin/busybox", "env", f"{OWNER_VAR}={self.tag}", *recording], stdin)
        except BaseException:
            release(target, rec)
            raise
        self.pid = target.guest_pid(self.handle)

    def poll(self) -> ExecResult | None:
        """Its result once it exited (the record is then released), else None."""
        if self.result is None:
            self.result = self.target.poll(self.handle)
            if self.result is not None:
                self._forget()
        return self.result

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for it to exit on its own."""
        if self.result is None:
            self.result = self.target.wait(self.handle, timeout)
            self._forget()
        return self.result

    def stop(self, timeout: float = 10.0) -> None:
        """SIGKILL its session (the command and every child it left in it), then reap it."""
        if self.result is None:
            with contextlib.suppress(Exception):
                self.target.run(["/bin/busybox", "kill", "-9", f"-{self.pid}", str(self.pid)], timeout=timeout)
                self.result = self.target.wait(self.handle, timeout=timeout)
        # A wait cut short (a loaded host) does not mean it runs: the record goes once it is gone.
        if self.result is not None or not self._running():
            self._forget()

    def _running(self) -> bool:
        with contextlib.suppress(Exception):
            return self.target.run(["/bin/busybox", "kill", "-0", str(self.pid)], timeout=10).ok
        return True  # the guest cannot tell: keep the record, the next command reclaims it

    def disown(self) -> None:
        """It outlives this kbridge on purpose (a runner kept on a kept VM): no longer reclaimed."""
        self._forget()

    def _forget(self) -> None:
        if self.record is not None:
            release(self.target, self.record)
            self.record = None


def claim_running(target: Target, pid: int) -> Record | None:
    """Own, for a while, a process a spawn() started earlier (a runner kept on a kept VM): by the tag
    in its environment, so that if this kbridge is killed the next command stops it."""
    try:
        environ = target.read_file(f"/proc/{pid}/environ").split(b"\0")
    except KbridgeError:
        return None  # gone
    tag = next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(f"{OWNER_VAR}=".encode())), None)
    return claim(target, "process", tag) if tag and _NAME.fullmatch(tag) else None


def spawn(
    target: Target, argv: list[str], stdin: bytes | None = None, reserved: Reservation | None = None
) -> OwnedProcess:
    """Start ARGV in TARGET's guest, owned by this kbridge: a kill at any moment leaves nothing running.
    RESERVED: its record, made by reserve() before a probe was armed."""
    return OwnedProcess(target, argv, stdin, reserved)


def records(target: Target) -> list[Record]:
    """Every record in the guest (one file read)."""
    return list(_fold(_read(target)).values())


def _read(target: Target) -> list[str]:
    """The ledger, once no tracefs arming script runs (ARMING): one of a killed kbridge runs on in the
    guest, recording and defining its events; read before it ends, they would stay unowned."""
    res = target.run(["/bin/sh", "-c", _SETTLED, "kbridge-ledger", ARMING, LEDGER], timeout=60)
    return res.text.splitlines() if res.ok else []


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
        # Only live owners' records are kept, rewritten under ARMING and only if nothing was appended
        # since the read: an arming script a killed kbridge left running appends its records meanwhile.
        kept = "".join(f"+{json.dumps(r.__dict__)}\n" for r in live.values()).encode()
        size = str(sum(len(ln.encode()) + 1 for ln in lines))
        with contextlib.suppress(Exception):
            target.run(["/bin/sh", "-c", _COMPACT, "kbridge-ledger", ARMING, LEDGER, size], stdin=kept, timeout=60)
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
        res = target.run(["/bin/sh", "-c", _RECLAIM, "kbridge-reclaim", f"{OWNER_VAR}={rec.name}"], timeout=30)
        pids = res.text.split()
        return f"process{'es' if len(pids) > 1 else ''} {', '.join(pids)} stopped" if pids else None
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
