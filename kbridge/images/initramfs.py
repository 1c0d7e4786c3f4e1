"""The image's initramfs: busybox, kbridge's init, qemu-guest-agent with its libraries, the virtio drivers.

Written as a newc cpio from unpacked Debian packages (the sysroot), with no chroot: the
agent's library closure is followed through DT_NEEDED and symlinks are resolved as the
guest would, never escaping to the host.
"""

from __future__ import annotations

import os
from pathlib import Path

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images.cpio import CpioWriter
from kbridge.images.modtree import module_bytes, module_closure, module_list

# Guest drivers the init loads (with their dependencies), for the agent's channel.
GUEST_MODULES = ("virtio_pci", "virtio_console")


def build_initramfs(arch: Arch, krel: str, modroot: Path, sysroot: Path, out: Path) -> None:
    with out.open("wb") as f:
        w = CpioWriter(f)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc/kbridge"):
            w.dir(d)
        w.chardev("dev/console", 5, 1)  # the kernel opens it for init's stdio before devtmpfs
        w.chardev("dev/null", 1, 3)
        w.file("bin/busybox", _inside(sysroot, "bin/busybox").read_bytes(), 0o755)
        w.file("init", (GUEST_DIR / "init").read_bytes(), 0o755)
        w.file("usr/lib/kbridge/stream", (GUEST_DIR / "stream").read_bytes(), 0o755)
        _copy_with_libs(w, sysroot, "usr/sbin/qemu-ga")
        listed = []
        for ko in module_closure(modroot, GUEST_MODULES):
            # Stored uncompressed under /lib/modules: busybox insmod takes plain ELF only.
            rel = f"lib/modules/{krel}/" + ko.relative_to(modroot).as_posix()
            rel = rel[: rel.index(".ko") + 3]
            w.file(rel, module_bytes(ko))
            listed.append("/" + rel)
        w.file("etc/kbridge/modules", module_list(listed))
        w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        w.file("etc/group", b"root:x:0:\n")
        w.close()


def _copy_with_libs(w: CpioWriter, sysroot: Path, rel: str) -> None:
    """Copy a dynamically linked program and its library closure (DT_NEEDED) from SYSROOT."""
    search = [d for d in ("lib", "usr/lib") for d in (f"{d}/{_multiarch(sysroot)}", d) if (sysroot / d).is_dir()]
    pending = [rel]
    seen: set[str] = set()
    while pending:
        cur = pending.pop()
        if cur in seen:
            continue
        seen.add(cur)
        data = _inside(sysroot, cur).read_bytes()
        w.file(cur, data, 0o755)
        from kbridge import elf

        if interp := elf.interpreter(data):
            interp = interp.lstrip("/")
            if interp not in seen:
                seen.add(interp)
                w.file(interp, _inside(sysroot, interp).read_bytes(), 0o755)
        for lib in elf.needed(data, cur):
            hit = next((f"{d}/{lib}" for d in search if (sysroot / d / lib).exists()), None)
            if hit is None:
                raise KbridgeError(f"{cur} needs {lib}, which the guest packages do not provide")
            pending.append(hit)


def _inside(sysroot: Path, rel: str) -> Path:
    """Resolve REL's symlinks as the guest would, with SYSROOT as /, never escaping to the host."""
    for _ in range(40):
        p = sysroot / rel
        if not p.exists() and not p.is_symlink() and (sysroot / "usr" / rel).exists():
            # /usr-merged packages (trixie on) ship usr/bin, usr/lib: the /bin, /lib and
            # /lib64 links come from base-files, which the closure does not unpack.
            p = sysroot / "usr" / rel
            rel = "usr/" + rel
        if not p.is_symlink():
            return p
        target = os.readlink(p)
        rel = os.path.normpath(
            target.lstrip("/") if target.startswith("/") else os.path.join(os.path.dirname(rel), target)
        )
    raise KbridgeError(f"symlink loop at {rel} in the guest packages")


def _multiarch(sysroot: Path) -> str:
    # The multiarch directory: x86_64-linux-gnu, aarch64-linux-gnu, arm-linux-gnueabihf (armhf).
    for lib in (sysroot / "lib", sysroot / "usr/lib"):
        for cand in lib.iterdir() if lib.is_dir() and not lib.is_symlink() else ():
            if cand.is_dir() and cand.name.endswith(("-linux-gnu", "-linux-gnueabihf")):
                return cand.name
    raise KbridgeError("guest libc not found in the unpacked packages")
