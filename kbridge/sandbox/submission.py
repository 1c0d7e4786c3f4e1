"""A submission, checked and copied before anything builds it.

A kernel-lab submission is a directory of a few sources: kbridge refuses one holding anything but
regular files and directories, or too much (check_tree), and copies only its C sources into a
build directory it owns (copy_submission: race-free, no symlink is ever followed, no FIFO opened).
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kbridge.sandbox.errors import SubmissionRefused

SOURCE_PATTERNS = ("*.c", "*.h")
VCS_DIRS = frozenset({".git", ".hg", ".svn"})  # never entered, never copied
MAX_FILES = 500
MAX_TREE_BYTES = 32 << 20
MAX_DEPTH = 16
MAX_SOURCE_BYTES = 1 << 20  # one copied source file
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # copied names: no ":" (it would spoof FILE:LINE diagnostics)


@dataclass(frozen=True)
class _Entry:
    rel: str
    dir_fd: int  # open while the entry is yielded
    name: str
    st: os.stat_result


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    return "a special file"


def _walk(
    src: Path, *, max_files: int = MAX_FILES, max_bytes: int = MAX_TREE_BYTES, max_depth: int = MAX_DEPTH
) -> Iterator[_Entry]:
    """Every regular file under SRC, refusing the first entry that is not a regular file or a
    directory. Directories are opened with O_NOFOLLOW relative to their parent's descriptor, so a
    path swapped for a symlink meanwhile is refused, not followed; nothing but lstat touches an entry."""
    shown = str(src)
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        raise SubmissionRefused(
            f"submission {shown!r} is a symbolic link (to {os.readlink(src)!r}): refused",
            "hand in the directory itself",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise SubmissionRefused(f"submission {shown!r} is not a directory")
    top = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    count = 0
    total = 0

    def refuse(rel: str, what: str, hint: str) -> SubmissionRefused:
        return SubmissionRefused(f"submission {shown!r}: {rel!r} is {what}: refused before building", hint)

    def visit(dir_fd: int, prefix: str, depth: int) -> Iterator[_Entry]:
        nonlocal count, total
        with os.scandir(dir_fd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            if name in VCS_DIRS:
                continue
            rel = prefix + name
            count += 1
            if count > max_files:
                raise SubmissionRefused(
                    f"submission {shown!r} holds more than {max_files} files: refused", "hand in the lab directory only"
                )
            est = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            mode = est.st_mode
            if stat.S_ISLNK(mode):
                target = os.readlink(name, dir_fd=dir_fd)
                raise refuse(rel, f"a symbolic link (to {target!r})", "replace the link with the file itself")
            if stat.S_ISDIR(mode):
                if depth + 1 > max_depth:
                    raise refuse(rel, f"nested deeper than {max_depth} directories", "flatten the tree")
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    yield from visit(sub, rel + "/", depth + 1)
                finally:
                    os.close(sub)
                continue
            if not stat.S_ISREG(mode):
                raise refuse(rel, _kind(mode), "a submission holds only regular files and directories")
            if est.st_nlink > 1:
                raise refuse(rel, f"a hard link ({est.st_nlink} names for one file)", "copy it as a plain file")
            total += est.st_size
            if total > max_bytes:
                raise SubmissionRefused(
                    f"submission {shown!r} holds more than {max_bytes >> 20} MiB: refused",
                    "remove build products and large files",
                )
            yield _Entry(rel, dir_fd, name, est)

    try:
        yield from visit(top, "", 0)
    finally:
        os.close(top)


def check_tree(src: Path, **limits: int) -> None:
    """Refuse (SubmissionRefused, naming the entry) a submission holding a symlink, a FIFO, a socket,
    a device, a hard link, or too much (files, bytes, depth). Only lstat is used: never blocks."""
    for _ in _walk(Path(src), **limits):
        pass


def copy_submission(
    src: Path, dst: Path, *, patterns: Sequence[str] = SOURCE_PATTERNS, max_file: int = MAX_SOURCE_BYTES
) -> list[str]:
    """Check SRC as check_tree does and copy its files matching PATTERNS (C sources and headers:
    never a Makefile, Kbuild or .cmd file, which kbuild would execute) into DST, as new 0644 files.
    Each file is opened without following links and without blocking, and checked to be the
    regular file that was listed. The relative paths copied, sorted."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for e in _walk(Path(src)):
        if not any(fnmatch.fnmatchcase(e.name, p) for p in patterns):
            continue
        if not _SAFE_NAME.fullmatch(e.name) or not all(_SAFE_NAME.fullmatch(p) for p in e.rel.split("/")):
            raise SubmissionRefused(
                f"submission {str(src)!r}: the name {e.rel!r} is refused",
                "name sources with letters, digits, '_', '-', '+' and '.' only",
            )
        if e.st.st_size > max_file:
            raise SubmissionRefused(f"submission {str(src)!r}: {e.rel!r} is larger than {max_file >> 10} KiB: refused")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(e.name, flags, dir_fd=e.dir_fd)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (e.st.st_dev, e.st.st_ino):
                raise SubmissionRefused(f"submission {str(src)!r}: {e.rel!r} changed while it was copied: refused")
            chunks = []
            size = 0
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_file:
                    raise SubmissionRefused(f"submission {str(src)!r}: {e.rel!r} grew while it was copied: refused")
        finally:
            os.close(fd)
        out = dst / e.rel
        out.parent.mkdir(parents=True, exist_ok=True)
        wfd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(wfd, "wb") as f:
            f.write(b"".join(chunks))
        copied.append(e.rel)
    return sorted(copied)
