"""The host end of kbridge's guest agent (kbridge/guest/agent.c) on a machine reached over SSH.

One `agent serve` per connection does every guest command and file operation, one
request at a time; `agent copy` (the kernel log) and `agent hold` (a stream's guest
end) each run on a channel of their own. Every agent first says its pid and its
parents (sudo, sshd): kbridge's own processes, which a probe never counts.
"""

from __future__ import annotations

import base64
import ctypes
import os
import select
import shlex
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

from kbridge.arch import ARCHES, Arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images import programs
from kbridge.targets.base import ExecResult, GuestIOError

REQ = struct.Struct("<IIIIQ")  # op, nstr, strbytes, 0, datalen
REP = struct.Struct("<IiQQ")  # kind, code, len1, len2
OP_RUN, OP_SPAWN, OP_STATUS, OP_WRITE, OP_READ, OP_KILL, OP_CANCEL = range(1, 8)
R_READY, R_BUSY, R_RESULT, R_RUNNING, R_PID, R_DONE, R_CHUNK, R_END, R_ERROR = range(1, 10)
RUN_DIR = "/run/kbridge"  # the lock, the ownership ledger, stream links (a tmpfs: gone at reboot)
LOCK = f"{RUN_DIR}/vagrant.lock"
CONN_PREFIX = "/tmp/kbridge-vg-"  # the agent and its files, one directory per connection: /run may be noexec
CANCEL_GRACE_S = 10.0  # after a timeout, how long the agent gets to kill the command and answer

# Started by sudo on its own channel: one round trip installs the agent for the guest's arch and
# runs it. Both arches' builds come first on its stdin, one base64 line each (~40 KB: out of the
# command line, which `ps` in the guest would show); dash's read takes one byte at a time from a
# pipe, so what follows the two lines is the agent's. The pid file lets a later connection remove
# the directory of one whose agent was killed.
INSTALL = (
    f'set -e; umask 077; mkdir -p {RUN_DIR}; d={CONN_PREFIX}$1; mkdir "$d"; echo $$ > "$d/pid"; '
    "read -r x; read -r a; "
    'case "$(uname -m)" in x86_64) b=$x;; aarch64) b=$a;; '
    '*) echo "kbridge supports x86_64 and arm64 machines, not $(uname -m)" >&2; exit 3;; esac; '
    f'printf %s "$b" | base64 -d > "$d/agent"; chmod 700 "$d/agent"; exec "$d/agent" serve "$d" {LOCK}'
)


def die_with_parent() -> None:
    """In the child: SIGTERM when kbridge dies, so no ssh reader or master outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def install_argv(conn_id: str) -> list[str]:
    """The remote command that installs and starts `agent serve` (as root, through sudo -n)."""
    return ["sudo", "-n", "/bin/sh", "-c", INSTALL, "kbridge", conn_id]


def install_input() -> bytes:
    """What INSTALL reads first: the agent built for x86_64, then for arm64, base64, a line each."""
    return b"".join(base64.b64encode(programs.build(GUEST_DIR / "agent.c", a).read_bytes()) + b"\n" for a in _arches())


def _arches() -> list[Arch]:
    return [ARCHES["x86_64"], ARCHES["arm64"]]


def helper_argv(conn_id: str, mode: str, arg: str) -> list[str]:
    """`agent copy FILE` / `agent hold LINK` of connection CONN_ID (installed by its serve)."""
    return ["sudo", "-n", f"{CONN_PREFIX}{conn_id}/agent", mode, arg]


def parse_lineage(line: str) -> tuple[int, list[int]]:
    """'pid=P parents=A,B' -> (P, [A, B])."""
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    try:
        pid = int(fields["pid"])
        parents = [int(p) for p in fields.get("parents", "").split(",") if p]
    except (KeyError, ValueError):
        raise GuestIOError(f"the agent said {line[:80]!r} instead of its pid") from None
    return pid, parents


def remote(argv: list[str]) -> str:
    """ARGV as the one command line SSH hands to the login shell."""
    return shlex.join(argv)


@dataclass
class Helper:
    """A guest process kbridge started to serve itself (pid and parents: never probed)."""

    pid: int
    parents: list[int] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [self.pid, *self.parents]


class Agent:
    """The host end of `agent serve`: one request at a time, framed, binary-safe."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.name = name
        self.stdin = proc.stdin
        self.fd = proc.stdout.fileno()
        self.buf = bytearray()
        self.helper = Helper(0)

    # -- framing ---------------------------------------------------------------------

    def _fill(self, deadline: float | None) -> None:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            raise TimeoutError
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            raise GuestIOError(f"the agent in {self.name} closed its channel")
        self.buf += chunk

    def _exactly(self, n: int, deadline: float | None) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _reply(self, deadline: float | None) -> tuple[int, int, int, int]:
        kind, code, len1, len2 = REP.unpack(self._exactly(REP.size, deadline))
        return kind, code, len1, len2

    def _send(self, op: int, strings: list[str], data: bytes = b"") -> None:
        blob = b"".join(s.encode() + b"\0" for s in strings)
        if any("\0" in s for s in strings):
            raise KbridgeError("a guest command or path holds a NUL character")
        try:
            self.stdin.write(REQ.pack(op, len(strings), len(blob), 0, len(data)) + blob)
            if data:
                self.stdin.write(data)
            self.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise GuestIOError(f"the agent in {self.name} is gone") from None

    # -- start -----------------------------------------------------------------------

    def ready(self, timeout: float, on_busy: Callable[[], None], preamble: bytes = b"") -> Helper:
        """Wait for the machine's lock (ON_BUSY once if another kbridge holds it) and the agent's pids.

        PREAMBLE goes first on its stdin (what the command that installs it reads)."""
        if preamble:
            try:
                self.stdin.write(preamble)
                self.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # it ended already: its stderr says why
        deadline = time.monotonic() + timeout
        while True:
            kind, _, len1, _ = self._reply(deadline)
            if kind == R_BUSY:
                on_busy()
                deadline = time.monotonic() + timeout
                continue
            if kind != R_READY:
                raise GuestIOError(f"the agent in {self.name} answered {kind} before it was ready")
            pid, parents = parse_lineage(self._exactly(len1, deadline).decode(errors="replace"))
            self.helper = Helper(pid, parents)
            return self.helper

    # -- requests --------------------------------------------------------------------

    def run(self, argv: list[str], stdin: bytes | None, timeout: float | None) -> ExecResult:
        """Run ARGV (its own process group) and wait; past TIMEOUT s it is killed and TimeoutError raised."""
        self._send(OP_RUN, argv, stdin or b"")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._result(self._reply(deadline), None)
        except TimeoutError:
            pass
        self._send(OP_CANCEL, [])
        try:
            self._result(self._reply(time.monotonic() + CANCEL_GRACE_S), None)
        except TimeoutError:
            raise GuestIOError(f"the agent in {self.name} did not stop {argv[0]!r}") from None
        raise TimeoutError

    def _result(self, rep: tuple[int, int, int, int], deadline: float | None) -> ExecResult:
        kind, code, len1, len2 = rep
        if kind == R_ERROR:
            raise GuestIOError(f"the agent in {self.name} could not start the command: {os.strerror(-code)}")
        if kind != R_RESULT:
            raise GuestIOError(f"the agent in {self.name} answered {kind} instead of a result")
        out = self._exactly(len1, deadline)
        err = self._exactly(len2, deadline)
        return exec_result(code, out, err)

    def spawn(self, conn_id: str, argv: list[str], stdin: bytes | None) -> int:
        """Start ARGV; its pid. Its output waits in files named CONN_ID until status() collects it."""
        self._send(OP_SPAWN, [conn_id, *argv], stdin or b"")
        kind, code, _, _ = self._reply(None)
        if kind != R_PID:
            raise GuestIOError(f"the agent in {self.name} could not start {argv[0]!r}: {os.strerror(-code)}")
        return code

    def status(self, pid: int, conn_id: str, wait_s: float = 0.0) -> ExecResult | None:
        """The result of spawned PID once it exited (waiting up to WAIT_S), else None."""
        self._send(OP_STATUS, [str(pid), conn_id, str(int(wait_s * 1000))])
        rep = self._reply(None)
        if rep[0] == R_RUNNING:
            return None
        if rep[0] == R_ERROR:
            raise GuestIOError(f"guest process {pid} of {self.name} is not kbridge's (or was collected already)")
        return self._result(rep, None)

    def write(self, path: str, data: bytes, mode: str) -> int:
        """PATH := DATA (mode "w") or += DATA ("a"), one write(2) up to 1 MiB; 0 or the errno."""
        self._send(OP_WRITE, [path, mode], data)
        _, code, _, _ = self._reply(None)
        return -code

    def read(self, path: str, offset: int = 0, size: int = -1) -> Iterator[bytes]:
        """PATH's bytes from OFFSET, at most SIZE (-1: to its end), as the agent sends them.

        Read to its end: the reply's frames must all be taken off the channel.
        """
        self._send(OP_READ, [path, str(offset), str(size)])
        while True:
            kind, code, len1, _ = self._reply(None)
            if kind == R_CHUNK:
                yield self._exactly(len1, None)
                continue
            if code:
                raise FileNotFoundError(-code, os.strerror(-code))
            return

    def read_all(self, path: str, offset: int = 0, size: int = -1) -> bytes:
        """PATH's bytes (OSError with the errno on failure), every frame taken off the channel."""
        chunks: list[bytes] = []
        err: OSError | None = None
        try:
            for chunk in self.read(path, offset, size):
                chunks.append(chunk)
        except OSError as e:
            err = e
        if err is not None:
            raise err
        return b"".join(chunks)

    def kill(self, pid: int, sig: int) -> int:
        self._send(OP_KILL, [str(pid), str(sig)])
        _, code, _, _ = self._reply(None)
        return -code


def exec_result(status: int, out: bytes, err: bytes) -> ExecResult:
    """A wait(2) status as kbridge's result: the exit code, or 128+N and the signal that killed it."""
    if status & 0x7F == 0:
        return ExecResult((status >> 8) & 0xFF, out, err, None)
    sig = status & 0x7F
    return ExecResult(128 + sig, out, err, sig)


class PipeLines:
    """Lines from a host pipe (an ssh reader); None after `idle` s without data.

    An iterator object rather than a generator: an exception (Ctrl-C) raised while
    it waits leaves it usable, so cleanup can keep reading.
    """

    def __init__(self, stream: IO[bytes], what: str, name: str, check_alive: Callable[[], None]) -> None:
        self.fd = stream.fileno()
        self.what = what
        self.name = name
        self.check_alive = check_alive
        self.idle = 0.05
        self.buf = b""
        self.lines: list[bytes] = []

    def __iter__(self) -> PipeLines:
        return self

    def __next__(self) -> str | None:
        while not self.lines:
            ready, _, _ = select.select([self.fd], [], [], self.idle)
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                self.check_alive()
                raise GuestIOError(f"the stream {self.what} from {self.name} closed")
            *self.lines, self.buf = (self.buf + chunk).split(b"\n")
        return self.lines.pop(0).decode(errors="replace")
