"""Files in and out of a guest (`kbridge vm push|pull`, Guest.push/pull), streamed in chunks.

Neither direction holds a whole file in memory: a push reads the local file a chunk
at a time, a pull writes each chunk to a temporary file next to the destination,
renamed into place once complete. A pull takes regular files only (a device such as
/dev/zero never ends) and at most MAX_PULL_BYTES; a large transfer shows progress.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

from kbridge import elf, progress
from kbridge.arch import by_elf_machine
from kbridge.errors import KbridgeError
from kbridge.targets.base import Target

CHUNK = 1 << 20
MAX_PUSH_BYTES = 1 << 30
MAX_PULL_BYTES = 1 << 30
PROGRESS_EVERY = 16 << 20
_READONLY_TREES = ("/proc", "/sys", "/dev")


def guest_path(path: str, writing: bool) -> str:
    """PATH if it is a plain absolute guest path (no '..', no control characters)."""
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or len(path) > 4096
        or any(ord(c) < 0x20 or c == "\x7f" for c in path)
    ):
        raise KbridgeError(f"invalid guest path {path!r}", "give an absolute path, e.g. /tmp/client")
    norm = posixpath.normpath(path)
    if ".." in path.split("/"):
        raise KbridgeError(f"guest path {path!r} has '..' in it", f"write it out: {norm}")
    if writing and any(norm == t or norm.startswith(t + "/") for t in _READONLY_TREES):
        raise KbridgeError(
            f"guest path {path!r} is a kernel interface, not a place for files",
            "push to /tmp or /root; write kernel interfaces from a test with vm.run",
        )
    return norm + ("/" if path.endswith("/") and norm != "/" else "")


def _stat(target: Target, path: str) -> tuple[str, int] | None:
    """(type, size) of PATH in the guest ('regular file', 'directory', 'character special file', ...)."""
    res = target.run(["/bin/busybox", "stat", "-L", "-c", "%F|%s", path], timeout=30)
    if not res.ok:
        return None
    kind, _, size = res.text.strip().rpartition("|")
    return kind, int(size) if size.isdigit() else 0


def check_machine(target: Target, local: Path) -> None:
    """Refuse an executable built for another arch than the guest's (it would fail with 'not found')."""
    with open(local, "rb") as f:
        head = f.read(64)
    if not elf.is_elf(head):
        return
    try:
        machine = elf.machine(head + b"\0" * 64)
    except KbridgeError:
        return  # not an ELF file pyelftools can read: data, copied as it is
    if machine not in (target.arch.elf_machine, elf.EM_BPF):  # an eBPF object loads on every arch
        built = by_elf_machine(machine)
        what = built.name if built else f"ELF machine {machine}"
        raise KbridgeError(
            f"{str(local)!r} is a {what} program and the guest is {target.arch.name}: it would not run there",
            f"build it for {target.arch.name}: {target.arch.gcc('12')} -static ...",
        )


def push(target: Target, local: Path, guest: str) -> str:
    """Copy the local file LOCAL to GUEST (a path ending in / is a directory); its mode kept."""
    local = Path(local)
    if not local.is_file():
        raise KbridgeError(f"{str(local)!r} is not a file", "push copies one regular file")
    size = local.stat().st_size
    if size > MAX_PUSH_BYTES:
        raise KbridgeError(f"{str(local)!r} is {size >> 20} MiB", f"push moves files up to {MAX_PUSH_BYTES >> 20} MiB")
    check_machine(target, local)
    dest = guest_path(guest, writing=True)
    if dest.endswith("/") or ((st := _stat(target, dest)) is not None and st[0] == "directory"):
        dest = posixpath.join(dest, local.name)
        guest_path(dest, writing=True)
    parent = posixpath.dirname(dest)
    res = target.run(["/bin/busybox", "mkdir", "-p", parent], timeout=30)
    if not res.ok:
        raise KbridgeError(f"cannot create {parent!r} in the guest: {res.stderr.decode(errors='replace').strip()}")
    try:
        with open(local, "rb") as f, _progress(f"pushing {local.name} ({size >> 20} MiB)", size):
            target.write_file(dest, f.read(CHUNK), "w")
            while chunk := f.read(CHUNK):
                target.write_file(dest, chunk, "a")
        res = target.run(["/bin/busybox", "chmod", oct(local.stat().st_mode & 0o777)[2:], dest], timeout=30)
        if not res.ok:
            raise KbridgeError(f"chmod {dest} in the guest failed: {res.stderr.decode(errors='replace').strip()}")
    except BaseException:
        with contextlib.suppress(Exception):
            target.run(["/bin/busybox", "rm", "-f", dest], timeout=10)
        raise
    return dest


def pull(target: Target, guest: str, local: Path) -> Path:
    """Copy the guest file GUEST to LOCAL (into it, if LOCAL is a directory); the path written."""
    src = guest_path(guest, writing=False).rstrip("/")
    local = Path(local)
    if local.is_dir():
        local = local / posixpath.basename(src)
    if not local.parent.is_dir():
        raise KbridgeError(f"cannot write {str(local)!r}: the directory {str(local.parent)!r} does not exist")
    if not os.access(local.parent, os.W_OK):
        raise KbridgeError(f"cannot write {str(local)!r}: {str(local.parent)!r} is not writable")
    st = _stat(target, src)
    if st is None:
        raise KbridgeError(f"{src!r} does not exist in the guest", "kbridge vm exec -- ls -l DIR shows what is there")
    kind, size = st
    if kind == "directory":
        raise KbridgeError(f"{src!r} is a directory in the guest", "pull copies one file")
    if kind not in ("regular file", "regular empty file"):
        raise KbridgeError(
            f"{src!r} is a {kind} in the guest, not a file: it may never end",
            "pull copies regular files; copy what you need to a file first (kbridge vm exec -- sh -c '... > /tmp/f')",
        )
    tmp = local.with_name(f".{local.name}.kbridge-tmp")
    got = 0
    try:
        with open(tmp, "wb") as out, _progress(f"pulling {posixpath.basename(src)}", size):
            for chunk in target.read_chunks(src, CHUNK):
                got += len(chunk)
                if got > MAX_PULL_BYTES:
                    raise KbridgeError(f"{src!r} is larger than {MAX_PULL_BYTES >> 20} MiB", "pull a smaller file")
                out.write(chunk)
        tmp.replace(local)
    except OSError as e:
        raise KbridgeError(f"cannot write {str(local)!r}: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return local


@contextlib.contextmanager
def _progress(what: str, size: int) -> Iterator[None]:
    """A progress step for transfers that take a while (over PROGRESS_EVERY bytes)."""
    if size < PROGRESS_EVERY:
        yield
        return
    with progress.step(what):
        yield
