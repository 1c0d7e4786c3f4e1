"""What every cached image kind shares: one builder at a time, staged builds, checksums.

A build runs under a lock file in a temporary directory renamed into place only when
complete; its manifest's SHA-256 sums are checked cheaply on each use, so a partial or
corrupted build is detected and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_intact(d: Path, sums: dict[str, str], full: bool = False) -> bool:
    """Whether the files of manifest SUMS under D are the ones it was written for.

    Cheap on every use: each file's size and mtime against those recorded when it was last
    hashed (state/verified.json); a file that differs (or FULL) is hashed again, and a damaged
    one makes the image unusable (it is rebuilt), however it was damaged.
    """
    stamp_file = d / "state" / "verified.json"
    try:
        stamps = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        stamps = {}
    changed = False
    for rel, digest in sums.items():
        try:
            st = (d / rel).stat()
        except OSError:
            return False
        now = [st.st_size, st.st_mtime_ns]
        if full or stamps.get(rel) != now:
            if sha256(d / rel) != digest:
                return False
            stamps[rel] = now
            changed = True
    if changed:
        with contextlib.suppress(OSError):
            stamp_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = stamp_file.with_name(f"verified.{os.getpid()}.json")
            tmp.write_text(json.dumps(stamps))
            tmp.replace(stamp_file)
    return True


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on PATH (created) for the block: one builder per cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A temporary directory beside FINAL that replaces it when the block completes.

    On any error (Ctrl-C included) it is removed and FINAL is left as it was, so
    the cache never holds a half-built image under the real name.
    """
    final.parent.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=final.parent))
    try:
        yield work
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
