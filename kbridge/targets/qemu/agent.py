"""The qemu-guest-agent client: run programs and move files in the guest over virtio-serial.

The agent speaks one JSON object per line over a unix socket and has no greeting:
a client first sends 0xFF + guest-sync-delimited, and discards bytes up to the
0xFF the agent echoes back, so a stale half-read reply from an earlier client is
never taken for an answer. (QMP, QEMU's own channel, is spoken by the qemu.qmp
library: kbridge.targets.qemu.qmp.)
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from collections.abc import Iterator

from kbridge.targets.base import ExecResult, GuestIOError


class _JsonSocket:
    def __init__(self, path: str, deadline: float) -> None:
        self.path = path
        self.buf = b""
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise GuestIOError(f"no QEMU socket at {path}") from None
                time.sleep(0.02)

    def send(self, obj: dict, prefix: bytes = b"") -> None:
        try:
            self.sock.sendall(prefix + json.dumps(obj).encode() + b"\n")
        except OSError as e:
            raise GuestIOError(f"{self.path} closed: the VM stopped ({e.strerror})") from None

    def recv(self, timeout: float | None) -> dict:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise GuestIOError(f"no answer on {self.path} within {timeout} s") from None
            except OSError:
                chunk = b""
            if not chunk:
                raise GuestIOError(f"{self.path} closed: the VM stopped")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


class GuestAgent:
    """A connected qemu-guest-agent: run programs and move files in the guest."""

    def __init__(self, path: str, timeout: float = 60.0, retry_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        self.chan = _JsonSocket(path, deadline)
        self._dirty = False  # a call was interrupted: its reply may still arrive
        self._sync(deadline, retry_s)

    def _sync(self, deadline: float, retry_s: float = 0.5) -> None:
        # Each attempt uses a fresh token and only the newest one counts: replies to
        # earlier attempts (and the parse error the agent reports for the 0xFF byte
        # itself) all arrive before the newest reply, so nothing stale is left behind.
        while True:
            if time.monotonic() > deadline:
                raise GuestIOError("the guest agent did not answer: the guest did not finish booting")
            token = random.randrange(1, 1 << 31)
            self.chan.send({"execute": "guest-sync-delimited", "arguments": {"id": token}}, b"\xff")
            try:
                while True:
                    self.chan.buf = self.chan.buf.replace(b"\xff", b"")
                    if self.chan.recv(retry_s).get("return") == token:
                        return
            except GuestIOError as e:
                if "closed" in e.message:
                    raise
            except ValueError:
                self.chan.buf = b""

    def call(self, command: str, timeout: float = 30.0, **arguments: object) -> object:
        return self.call_with(command, arguments, timeout)

    def call_with(self, command: str, arguments: dict[str, object], timeout: float = 30.0) -> object:
        """call() for arguments whose names are not Python identifiers (buf-b64)."""
        if self._dirty:  # e.g. Ctrl-C mid-call: drop its late reply before asking anything else
            self._sync(time.monotonic() + 10.0)
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._dirty = True
        self.chan.send(msg)
        reply = self.chan.recv(timeout)
        self._dirty = False
        if "error" in reply:
            raise GuestIOError(f"guest agent {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def spawn(self, argv: list[str], stdin: bytes | None = None, capture: bool = True) -> int:
        """Start ARGV in the guest (no shell involved); return its guest pid."""
        args: dict = {"path": argv[0], "arg": argv[1:], "capture-output": capture}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        ret = self.call("guest-exec", **args)
        if not isinstance(ret, dict) or "pid" not in ret:
            raise GuestIOError(f"guest agent guest-exec: unexpected answer {ret!r}")
        return int(ret["pid"])

    def status(self, pid: int) -> ExecResult | None:
        """The result of a spawned command, or None while it runs."""
        st = self.call("guest-exec-status", pid=pid)
        assert isinstance(st, dict)
        if not st.get("exited"):
            return None
        return ExecResult(
            exitcode=st.get("exitcode", -1),
            stdout=base64.b64decode(st.get("out-data", "")),
            stderr=base64.b64decode(st.get("err-data", "")),
            signal=st.get("signal"),
        )

    def wait(self, pid: int, timeout: float | None = None) -> ExecResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while (res := self.status(pid)) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise GuestIOError(f"guest command (pid {pid}) still running after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return res

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float | None = 120) -> ExecResult:
        return self.wait(self.spawn(argv, stdin), timeout)

    def _exchange(self, msgs: list[tuple[str, dict[str, object]]], timeout: float = 30.0) -> list[dict]:
        """Send MSGS at once and read their replies in order (each a result or an error)."""
        if self._dirty:
            self._sync(time.monotonic() + 10.0)
        self._dirty = True
        for command, arguments in msgs:
            self.chan.send({"execute": command, "arguments": arguments})
        replies = [self.chan.recv(timeout) for _ in msgs]
        self._dirty = False
        return replies

    def _calls(self, msgs: list[tuple[str, dict[str, object]]], timeout: float = 30.0) -> list[object]:
        """Send MSGS at once and read their replies in order: one round trip instead of len(MSGS).

        The agent runs them one after the other, whatever each one's outcome; the first
        error is raised once every reply has been read.
        """
        replies = self._exchange(msgs, timeout)
        for (command, _), reply in zip(msgs, replies, strict=True):
            if "error" in reply:
                raise GuestIOError(f"guest agent {command}: {reply['error'].get('desc', reply['error'])}")
        return [reply.get("return") for reply in replies]

    def write_file(self, path: str, data: bytes, mode: str = "w") -> None:
        handle = self.call("guest-file-open", path=path, mode=mode)
        # One request at a time, each answered before the next is sent: several writes in
        # flight stalled the agent, and a write pipelined with its close once went unanswered
        # for 30 s on a loaded host. The close runs whatever happened.
        try:
            for off in range(0, len(data), 1 << 20):
                chunk = data[off : off + (1 << 20)]
                self.call_with(
                    "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()}, timeout=60.0
                )
        finally:
            self.call("guest-file-close", handle=handle)

    def read_file(self, path: str) -> bytes:
        handle = self.call("guest-file-open", path=path, mode="r")
        # Most files kbridge reads fit one read: read and close in one round trip.
        ret, _ = self._calls(
            [("guest-file-read", {"handle": handle, "count": 1 << 20}), ("guest-file-close", {"handle": handle})]
        )
        assert isinstance(ret, dict)
        if ret.get("eof") or not ret.get("count"):
            return base64.b64decode(ret.get("buf-b64", ""))
        return self._read_chunks(path)  # longer (a symbol table): read it again, to its end

    def read_small(self, paths: list[str]) -> dict[str, bytes | None]:
        """Small files (a pid file) in two round trips, however many: each one's bytes, None if unreadable."""
        opened = self._exchange([("guest-file-open", {"path": p, "mode": "r"}) for p in paths])
        handles = {p: r["return"] for p, r in zip(paths, opened, strict=True) if "return" in r}
        msgs: list[tuple[str, dict[str, object]]] = []
        for h in handles.values():
            msgs += [("guest-file-read", {"handle": h, "count": 4096}), ("guest-file-close", {"handle": h})]
        replies = iter(self._exchange(msgs))
        out: dict[str, bytes | None] = dict.fromkeys(paths)
        for p in handles:
            read, _close = next(replies), next(replies)
            if isinstance(ret := read.get("return"), dict):
                out[p] = base64.b64decode(ret.get("buf-b64", ""))
        return out

    def _read_chunks(self, path: str) -> bytes:
        return b"".join(self.read_chunks(path))

    def read_chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        """PATH's bytes, SIZE at a time."""
        handle = self.call("guest-file-open", path=path, mode="r")
        try:
            while True:
                ret = self.call("guest-file-read", handle=handle, count=size)
                assert isinstance(ret, dict)
                if chunk := base64.b64decode(ret.get("buf-b64", "")):
                    yield chunk
                if ret.get("eof") or not ret.get("count"):
                    return
        finally:
            self.call("guest-file-close", handle=handle)

    def close(self) -> None:
        self.chan.close()
