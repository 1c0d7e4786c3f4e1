"""The root shell kept open on a Vagrant machine's SSH connection: one framed round trip per command."""

from __future__ import annotations

import base64
import ctypes
import os
import secrets
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from typing import IO

from kbridge.targets.base import ExecResult, GuestIOError

RUN_DIR = "/run/kbridge"  # guest-side stream links, pid files, the root shell's directory
TAINT_DIE = 1 << 7  # /proc/sys/kernel/tainted 'D': the kernel oopsed since boot
MASTER_TIMEOUT_S = 30.0
# Runs as the SSH user (no sudo) so that $PPID is sshd's session process, which
# carries every channel of the control master: it writes what the guest sends us.
PROBE = (
    'echo "ppid=$PPID"; echo "krel=$(uname -r)"; echo "machine=$(uname -m)"; '
    'echo "tainted=$(cat /proc/sys/kernel/tainted)"; '
    "[ -e /usr/lib/python3/dist-packages/bcc/__init__.py ] && echo bcc=yes; "
    "dmesg 2>/dev/null | grep -q 'Hypervisor detected: KVM' && echo kvm=yes; "
    "true"
)


def die_with_parent() -> None:
    """In the child: SIGTERM when kbridge dies, so no ssh reader or master outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


AGENT_SCRIPT = r"""
d=/run/kbridge/agent.$$
mkdir -p "$d" && : > "$d/in" || exit 1
echo "$$" > /run/kbridge/agent.pid
kb_in() { base64 -d > "$d/in"; }
kb_run() {
    m=$1; shift
    printf 'KB<%s\n' "$m"
    ( exec "$@" ) < "$d/in" 2> "$d/err"
    rc=$?
    printf '\nKB>%s %s\n' "$m" "$rc"
    if [ -s "$d/err" ]; then printf 'KBERR %s\n' "$(wc -c < "$d/err")"; cat "$d/err"; else printf 'KBERR 0\n'; fi
    : > "$d/in"
}
kb_write() {
    printf 'KB<%s\n' "$1"
    if [ "$2" = a ]; then cat "$d/in" >> "$3"; else cat "$d/in" > "$3"; fi 2> "$d/err"
    rc=$?
    printf '\nKB>%s %s\n' "$1" "$rc"
    if [ -s "$d/err" ]; then printf 'KBERR %s\n' "$(wc -c < "$d/err")"; cat "$d/err"; else printf 'KBERR 0\n'; fi
    : > "$d/in"
}
trap 'rm -rf "$d"' EXIT
printf 'KBREADY %s\n' "$$"
"""


class RootShell:
    """The host end of the root shell: send a framed command, read its framed result."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.pid = 0

    def _fill(self, deadline: float | None) -> None:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            raise TimeoutError
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            raise GuestIOError("the guest's root shell closed")
        self.buf += chunk

    def _until(self, token: bytes, deadline: float | None) -> bytes:
        while (i := self.buf.find(token)) < 0:
            self._fill(deadline)
        head, self.buf = self.buf[:i], self.buf[i + len(token) :]
        return head

    def _exactly(self, n: int, deadline: float | None) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        head, self.buf = self.buf[:n], self.buf[n:]
        return head

    def ready(self, timeout: float) -> None:
        line = self._until(b"\n", time.monotonic() + timeout)
        self.pid = int(line.split(b"KBREADY ", 1)[1])

    def run(
        self, argv: list[str], stdin: bytes | None, timeout: float | None, write_to: tuple[str, str] | None = None
    ) -> ExecResult:
        """Run ARGV with STDIN; or, with WRITE_TO (path, "w" | "a"), write STDIN to path in one write(2)."""
        mark = secrets.token_hex(8)
        text = ""
        if stdin:
            b64 = base64.encodebytes(stdin).decode()
            text += f"kb_in <<'KBIN{mark}'\n{b64}KBIN{mark}\n"
        if write_to is not None:
            text += "kb_write " + shlex.join([mark, write_to[1], write_to[0]]) + "\n"
        else:
            text += "kb_run " + shlex.join([mark, *argv]) + "\n"
        self.stdin.write(text.encode())
        self.stdin.flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._until(f"KB<{mark}\n".encode(), deadline)
        out = self._until(f"\nKB>{mark} ".encode(), deadline)
        code = int(self._until(b"\n", deadline))
        size = int(self._until(b"\n", deadline).split(b"KBERR ", 1)[1])
        err = self._exactly(size, deadline)
        return ExecResult(code, out, err, code - 128 if 128 < code < 192 else None)


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


class Spawned:
    """A guest command started over SSH: its host ssh process and output files."""

    def __init__(self, proc: subprocess.Popen[bytes], out: IO[bytes], err: IO[bytes]) -> None:
        self.proc = proc
        self.out = out
        self.err = err
        self.guest_pid: int | None = None
        self.result: ExecResult | None = None
