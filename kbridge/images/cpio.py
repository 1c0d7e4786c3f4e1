"""Write a newc cpio archive (the initramfs format) with root ownership, without cpio(1)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class CpioWriter:
    """Append files, directories, symlinks and device nodes to an uncompressed newc archive."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 1
        self.written: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.written:
            return
        self.written.add(name)
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + name.encode() + b"\0")
        self.out.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = [p for p in name.split("/") if p and p != "."]
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def copy(self, name: str, src: Path) -> None:
        """Copy SRC (following symlinks) to NAME, keeping its executable bits."""
        self.file(name, src.read_bytes(), src.stat().st_mode & 0o777)

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
