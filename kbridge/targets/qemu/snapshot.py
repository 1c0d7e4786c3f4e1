"""Saved state of a booted, idle guest: a fresh VM restores it instead of booting.

Under TCG a boot to a ready guest agent takes 2-5 s; restoring the saved RAM and
device state of a guest that had just booted takes ~0.3 s (QEMU 7.2). The state
is saved once, right after a normal boot, with QMP `stop` + `migrate` to a zstd
stream, and restored with the same command line plus `-incoming`.

Nothing inside the saved state ties it to the image: a changed initramfs would
restore silently and run the old one. So a saved state is keyed on everything
it depends on (the image's manifest and files, `qemu --version`, the QEMU
command line minus this VM's socket paths, the guest init's version) and a new
key replaces the states saved for the image before. Several QEMUs may restore
one file at once (socket paths are not in the state).

Images with a root filesystem on a disk (the bcc flavour) are not saved: the
disk's throwaway overlay is not part of the migration stream, and a guest whose
RAM remembers writes the restored disk does not have would corrupt it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from kbridge.images.image import Image, guest_digest
from kbridge.paths import cache_dir
from kbridge.targets.base import GuestIOError
from kbridge.targets.qemu.qmp import Qmp

SAVE_TIMEOUT_S = 60.0
RESTORE_TIMEOUT_S = 30.0  # past this, the caller boots normally


def root() -> Path:
    return cache_dir() / "snapshots"


def supported(image: Image, accel: str) -> bool:
    """Whether IMAGE's guest may be saved and restored (TCG, no disk, zstd on the host)."""
    if os.environ.get("KBRIDGE_SNAPSHOT", "1") == "0":
        return False
    return accel == "tcg" and not (image.dir / "rootfs.ext4").exists() and shutil.which("zstd") is not None


def _qemu_version(binary: str) -> str:
    """`BINARY --version`, cached by the binary's path, size and mtime (it costs a QEMU start)."""
    path = shutil.which(binary) or binary
    st = os.stat(path)
    stamp = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
    cache = root() / "qemu-versions.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp not in known:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True)
        known[stamp] = out.stdout.strip()
        root().mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    return str(known[stamp])


def key(argv: list[str], image: Image, rundir: Path) -> str:
    """What the saved state of a guest started with ARGV from IMAGE depends on, hashed."""
    h = hashlib.sha256()
    h.update((image.dir / "manifest.json").read_bytes())
    initrd = Path(argv[argv.index("-initrd") + 1]) if "-initrd" in argv else image.initramfs
    for f in (image.kernel, image.initramfs, initrd):
        st = f.stat()  # the manifest names the files; a file rewritten in place changes these
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(_qemu_version(argv[0]).encode())
    h.update(json.dumps([a.replace(str(rundir), "<run>") for a in argv]).encode())
    h.update(guest_digest().encode())
    return h.hexdigest()[:24]


def path_for(image: Image, state_key: str) -> Path:
    return root() / image.dir.name / f"{state_key}.zst"


def restore_args(state: Path) -> list[str]:
    """What to add to the QEMU command line to start from STATE instead of booting."""
    # QEMU runs an exec: migration URI with /bin/sh -c: the path is quoted for it.
    return ["-incoming", f"exec:zstd -d -q -c {shlex.quote(str(state))}"]


def wait_restored(qmp_sock: Path, deadline: float) -> Qmp:
    """Wait until the incoming migration ended and run the guest; the open QMP session."""
    qmp = Qmp(str(qmp_sock), timeout=max(0.1, deadline - time.monotonic()))
    try:
        while True:
            status = qmp.execute("query-status")
            assert isinstance(status, dict)
            if status.get("status") != "inmigrate":
                break
            if time.monotonic() > deadline:
                raise GuestIOError("the saved guest state did not load in time")
            time.sleep(0.01)
        if status.get("status") in ("failed", "internal-error", "shutdown"):
            raise GuestIOError(f"restoring the saved guest state failed: {status.get('status')}")
        if not status.get("running"):
            qmp.execute("cont")
    except BaseException:
        qmp.close()
        raise
    return qmp


def save(qmp_sock: Path, image: Image, state_key: str) -> None:
    """Save the running guest's state for STATE_KEY (briefly paused), replacing older keys'.

    The file appears under its final name only once complete, so a concurrent
    restore never reads half a state.
    """
    final = path_for(image, state_key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}")
    done = tmp.with_suffix(".done")
    qmp = Qmp(str(qmp_sock), timeout=10.0)
    try:
        qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        qmp.execute("stop")
        try:
            # The shell renames to .done only when zstd has written everything.
            out = f"zstd -1 -q -c -T0 > {shlex.quote(str(tmp))} && mv {shlex.quote(str(tmp))} {shlex.quote(str(done))}"
            qmp.execute("migrate", uri=f"exec:{out}")
            deadline = time.monotonic() + SAVE_TIMEOUT_S
            while True:
                st = qmp.execute("query-migrate")
                assert isinstance(st, dict)
                if st.get("status") == "completed":
                    break
                if st.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise GuestIOError(f"saving the guest state: migration {st.get('status')}")
                time.sleep(0.01)
        finally:
            qmp.execute("cont")
        while not done.exists():
            if time.monotonic() > deadline:
                raise GuestIOError("saving the guest state: zstd did not finish")
            time.sleep(0.01)
        done.replace(final)
        for old in final.parent.glob("*.zst"):
            if old != final:
                with contextlib.suppress(OSError):
                    old.unlink()  # saved for an image, QEMU or command line that is gone
    finally:
        qmp.close()
        for f in (tmp, done):
            with contextlib.suppress(OSError):
                f.unlink()


def discard(image: Image, state_key: str) -> None:
    """Forget a saved state that did not restore (the next boot saves a fresh one)."""
    with contextlib.suppress(OSError):
        path_for(image, state_key).unlink()
