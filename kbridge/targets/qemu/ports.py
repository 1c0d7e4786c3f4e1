"""The host end of a guest->host stream port (a virtio-serial port QEMU exposes as a Unix socket)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from kbridge.errors import KbridgeError


class PortReader:
    """Lines from a guest->host stream port; None after `idle` s without data.

    An iterator object rather than a generator: an exception (Ctrl-C) raised
    while it waits leaves it usable, so cleanup can keep reading.
    """

    def __init__(self, sock: socket.socket, port: str, check_alive: Callable[[], None]) -> None:
        self.sock = sock
        self.port = port
        self.idle = 0.05
        self.check_alive = check_alive
        self.buf = b""
        self.lines: list[bytes] = []

    def __iter__(self) -> PortReader:
        return self

    def __next__(self) -> str | None:
        while not self.lines:
            self.sock.settimeout(self.idle)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            if not chunk:
                self.check_alive()
                raise KbridgeError(f"the guest stream {self.port} closed")
            *self.lines, self.buf = (self.buf + chunk).split(b"\n")
        return self.lines.pop(0).decode(errors="replace")
