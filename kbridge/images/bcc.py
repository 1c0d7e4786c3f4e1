"""The bcc image flavours: the default image plus a Debian root filesystem with python3-bpfcc.

"bcc" holds python3-bpfcc (bcc programs written by hand: the three-ways lab); "bench" adds the
tools kbridge is measured against in the same guest kernel (bench/bench_speed.py): bcc's own tools
(funccount), bpftrace and perf-tools' `kprobe`.

Built from Debian packages like the default image (a private apt state, the
package closure unpacked with dpkg-deb: no chroot, no maintainer scripts, so a
foreign-arch rootfs needs no qemu-user binfmt), cached next to it:

  kernel, headers   symlinks to the default image's (same kernel)
  initramfs.cpio    the default initramfs + a second cpio archive (the kernel
                    unpacks concatenated archives) with virtio_blk, ext4 and a
                    module list that replaces the default one
  rootfs.ext4       python3-bpfcc, its closure and the kernel headers bcc
                    compiles against (/lib/modules/KREL/build and source); QEMU
                    attaches it read-only in effect (snapshot=on), the guest init
                    mounts it at /rootfs and kbridge runs bcc there with chroot
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kbridge import progress
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.images import modtree
from kbridge.images.apt import Mirrors, PrivateApt, extract, mirrors_from_env
from kbridge.images.cache import locked, staged
from kbridge.images.cpio import CpioWriter
from kbridge.images.ext4 import make_ext4
from kbridge.images.initramfs import GUEST_MODULES
from kbridge.images.kernelpkgs import kernel_packages
from kbridge.paths import cache_dir

FORMAT = 1  # bump when the flavour's layout changes
PACKAGES = ("python3-bpfcc",)
FLAVOURS: dict[str, tuple[str, ...]] = {
    "bcc": PACKAGES,
    # kprobe-perf is a bash script that needs the usual tools (Essential, so no package depends on them).
    "bench": (*PACKAGES, "bpfcc-tools", "bpftrace", "perf-tools-unstable", "bash", "coreutils", "grep", "sed", "gawk"),
}
# Guest drivers for the rootfs disk; crc32c_generic because ext4/jbd2 ask the crypto
# API for crc32c and there is no modprobe to load it on demand (crc32c-intel fails under TCG).
DISK_MODULES = ("virtio_blk", "crc32c_generic", "ext4")
# What bcc never needs at run time: documentation, translations, manuals.
_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/lintian")
ROOTFS_MOUNT = "/rootfs"  # where the guest init mounts it (kbridge/guest/init)


def flavour_dir(arch: Arch, suite: str, flavour: str = "bcc") -> Path:
    return cache_dir() / "images" / f"{suite}-{arch.name}-{flavour}"


def load(arch: Arch, suite: str = images.DEFAULT_SUITE, flavour: str = "bcc") -> images.Image | None:
    """The cached FLAVOUR image, or None when missing, partial or built for another default image."""
    base = images.load(arch, suite, verify=False)
    d = flavour_dir(arch, suite, flavour)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        base is None
        or manifest.get("format") != FORMAT
        or manifest.get("krel") != base.krel
        or manifest.get("base_guest") != images.guest_digest()
        or tuple(manifest.get("packages", PACKAGES)) != FLAVOURS[flavour]
    ):
        return None
    if not all((d / f).exists() for f in ("kernel", "initramfs.cpio", "rootfs.ext4", "headers")):
        return None
    return images.Image(d, arch, suite, base.krel, base.version, flavour=flavour)


def ensure(
    arch: Arch | str | None = None,
    suite: str = images.DEFAULT_SUITE,
    mirrors: Mirrors | None = None,
    rebuild: bool = False,
    flavour: str = "bcc",
) -> images.Image:
    """The FLAVOUR image for ARCH and SUITE, built (about a minute, ~400 MB) when missing or stale."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    if flavour not in FLAVOURS:
        raise KbridgeError(f"unknown image flavour {flavour!r}", f"use one of: {', '.join(FLAVOURS)}")
    if arch.bcc_refusal:
        raise KbridgeError(arch.bcc_refusal, f"on {arch.name} use --via kmod or --via tracefs (the default image)")
    if not rebuild and (img := load(arch, suite, flavour)):
        return img
    base = images.ensure(arch, suite, mirrors)
    with locked(cache_dir() / "images" / f".{suite}-{arch.name}-{flavour}.lock"):
        if not rebuild and (img := load(arch, suite, flavour)):
            return img
        _build(arch, suite, base, mirrors or mirrors_from_env(suite), flavour)
    img = load(arch, suite, flavour)
    if img is None:
        raise KbridgeError(f"the {flavour} image for {suite}/{arch.name} did not validate after building")
    return img


def _build(arch: Arch, suite: str, base: images.Image, mirrors: Mirrors, flavour: str) -> None:
    root = cache_dir()
    packages = FLAVOURS[flavour]
    final = flavour_dir(arch, suite, flavour)
    with staged(final) as work:
        # The same archive pockets as the default image (it may have done without -security).
        security = json.loads((base.dir / "manifest.json").read_text()).get("security", True)
        tag = "" if security else "-nosecurity"
        apt = PrivateApt(root / "apt" / f"{suite}-{arch.debian}{tag}", suite, arch.debian, mirrors, security)
        with progress.step(f"reading Debian {suite} package lists ({arch.debian})"):
            apt.update()
        pkgs = kernel_packages(apt, arch)
        krel = pkgs.krel
        if krel != base.krel:
            raise KbridgeError(
                f"Debian {suite} now has kernel {krel}, the cached image has {base.krel}",
                f"rebuild the default image first: kbridge image build --kernel {suite} --arch {arch.name} --rebuild",
            )
        common = list(pkgs.headers[1:])
        debs = work / "debs"
        with progress.step(f"downloading {', '.join(packages)}, their closure, kernel {krel} headers ({arch.debian})"):
            user = apt.download_closure(list(packages), debs / "user")
            kernel = apt.download([*pkgs.binary, *pkgs.headers], debs / "kernel")
        rootfs = work / "rootfs"
        with progress.step(f"unpacking {len(user) + len(kernel) - 1} packages into the {flavour} root filesystem"):
            for deb in user:
                extract(deb, rootfs)
            for deb in kernel:
                extract(deb, rootfs if deb.name.startswith("linux-headers-") else work / "kpkg")
            _finish_rootfs(rootfs, krel, common)
        with progress.step(f"building the {flavour} initramfs and ext4 root filesystem"):
            _initramfs(base, modtree.modroot(work / "kpkg", krel), krel, work / "initramfs.cpio")
            _mkfs(rootfs, work / "rootfs.ext4")
        for tmp in ("debs", "kpkg", "rootfs"):
            shutil.rmtree(work / tmp)
        os.symlink(base.kernel, work / "kernel")
        os.symlink(base.dir / "headers", work / "headers")
        (work / "manifest.json").write_text(
            json.dumps(
                {
                    "format": FORMAT,
                    "arch": arch.name,
                    "suite": suite,
                    "krel": krel,
                    "base_guest": images.guest_digest(),
                    "packages": list(packages),
                },
                indent=1,
            )
        )
    progress.info(f"{flavour} image ready: Debian {suite} {arch.name}, kernel {krel}")


def _finish_rootfs(rootfs: Path, krel: str, common: list[str]) -> None:
    """Links bcc needs (no CONFIG_IKHEADERS: it compiles against installed headers), minus the docs."""
    for rel in _PRUNE:
        shutil.rmtree(rootfs / rel, ignore_errors=True)
    # /usr-merged packages (trixie on) ship nothing under /bin, /lib...: the links that
    # base-files would make (not in the closure) are needed for /lib64/ld-linux-*.so.
    for top in ("bin", "sbin", "lib", "lib64"):
        if not (rootfs / top).exists() and not (rootfs / top).is_symlink() and (rootfs / "usr" / top).is_dir():
            os.symlink(f"usr/{top}", rootfs / top)
    mods = rootfs / "lib/modules" / krel
    mods.mkdir(parents=True, exist_ok=True)
    for link, target in (
        ("build", f"/usr/src/linux-headers-{krel}"),
        ("source", f"/usr/src/{common[0]}" if common else f"/usr/src/linux-headers-{krel}"),
    ):
        if (mods / link).is_symlink() or (mods / link).exists():
            (mods / link).unlink()
        os.symlink(target, mods / link)
    for d in ("proc", "sys", "dev", "tmp", "run", "etc"):
        (rootfs / d).mkdir(exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    if not (rootfs / "usr/bin/python3").exists():
        raise KbridgeError("python3 is missing from the unpacked bcc packages")


def _initramfs(base: images.Image, modroot: Path, krel: str, out: Path) -> None:
    """The default initramfs followed by a cpio with the disk drivers and a longer module list."""
    with out.open("wb") as f:
        f.write(base.initramfs.read_bytes())
        w = CpioWriter(f)
        listed = []
        for ko in modtree.module_closure(modroot, GUEST_MODULES + DISK_MODULES, optional=("crc32c_generic",)):
            # Uncompressed under /lib/modules, as in the default image (busybox insmod).
            rel = f"lib/modules/{krel}/" + ko.relative_to(modroot).as_posix()
            rel = rel[: rel.index(".ko") + 3]
            w.file(rel, modtree.module_bytes(ko))
            listed.append("/" + rel)
        w.file("etc/kbridge/modules", ("\n".join(listed) + "\n").encode())
        w.close()


def _mkfs(rootfs: Path, out: Path) -> None:
    size = sum(p.lstat().st_size for p in rootfs.rglob("*"))
    make_ext4(rootfs, out, int(size * 1.25 / 2**20) + 128, "kbridge-bcc", "bcc", journal=False)
