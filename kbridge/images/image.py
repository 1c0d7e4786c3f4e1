"""The default guest image: a Debian kernel, its headers and a busybox + qemu-guest-agent initramfs.

Built once per (suite, arch) from Debian packages into the cache, in a temporary
directory that is renamed into place only when complete; a manifest with SHA-256
sums is written last, so a partial or corrupted image is detected and rebuilt.
The build reads top to bottom: package closure (kernelpkgs.py) -> kernel ->
modules (modtree.py) -> initramfs (initramfs.py) -> manifest; the cache's locking,
staging and checksums are cache.py's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kbridge import progress
from kbridge.arch import Arch, get_arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images import kernelpkgs, modtree
from kbridge.images.apt import UNRELEASED, FetchError, Mirrors, PrivateApt, extract, mirrors_from_env
from kbridge.images.cache import files_intact, locked, sha256, staged
from kbridge.images.initramfs import build_initramfs
from kbridge.images.kconfig import check_config
from kbridge.paths import cache_dir

DEFAULT_SUITE = "bookworm"
FORMAT = 4  # bump when the image layout changes, so old caches are rebuilt


@dataclass(frozen=True)
class Image:
    """A built guest image in the cache."""

    dir: Path
    arch: Arch
    suite: str
    krel: str  # the kernel release, `uname -r` in the guest
    # the kernel's Debian package version (a built tree's: a digest of its build; a machine's own: of /proc/version)
    version: str
    flavour: str = "default"  # "bcc": with a root filesystem holding python3-bpfcc (images/bcc.py);
    # "debug": kbridge's sanitizer kernel (images/debugkernel.py); "tree": a user's kernel tree (kerneltree.py)
    kernel_id: str = ""  # the --kernel key it serves (kbridge.kernels) when that is not its suite
    cmdline: str = ""  # kernel arguments it boots with besides kbridge's own (kasan_multi_shot)
    # A machine kbridge did not build (images/foreign.py): how its headers are got on the first
    # module build, or the refusal that says how to install them.
    fetch_headers: Callable[[Image], None] | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """The kernel key (kbridge.kernels.resolve) of this image: its suite, "debug" or "tree:PATH"."""
        return self.kernel_id or self.suite

    @property
    def kernel(self) -> Path:
        return self.dir / "kernel"

    @property
    def initramfs(self) -> Path:
        return self.dir / "initramfs.cpio"

    @property
    def headers(self) -> Path:
        """The kbuild tree to build modules against (make -C this M=...)."""
        return self.dir / "headers/usr/src" / f"linux-headers-{self.krel}"

    @property
    def config(self) -> Path:
        """The kernel's .config: its headers', else the copy a machine's own kernel gave."""
        cfg = self.headers / ".config"
        return cfg if cfg.is_file() else self.dir / "config"

    def has_headers(self) -> bool:
        return (self.headers / "Makefile").is_file()

    def require_headers(self) -> None:
        """Make sure the headers are there (fetched once for a machine's own kernel), else refuse."""
        if (self.headers / "Makefile").is_file():
            return
        if self.fetch_headers is not None:
            self.fetch_headers(self)
        if not (self.headers / "Makefile").is_file():
            raise KbridgeError(f"no kernel headers for {self.krel} in {self.dir}", "kbridge image build --rebuild")

    @property
    def state(self) -> Path:
        """Where per-image facts learnt at run time are cached (symbol table, KVM verdict)."""
        return self.dir / "state"

    @property
    def vmlinux(self) -> Path | None:
        """The kernel's vmlinux with DWARF, for gdb (a built kernel's; Debian ships it in -dbg packages)."""
        path = self.dir / "gdb" / "vmlinux"
        return path if path.is_file() else None


# The guest-side files the initramfs holds (the others are pushed by the commands that use them).
INITRAMFS_FILES = ("init", "stream")


def guest_digest() -> str:
    """A digest of the guest-side files in the initramfs: an image built with other ones is rebuilt."""
    h = hashlib.sha256(str(FORMAT).encode())
    for name in INITRAMFS_FILES:
        h.update(name.encode() + b"\0" + (GUEST_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def image_dir(arch: Arch, suite: str) -> Path:
    return cache_dir() / "images" / f"{suite}-{arch.name}"


def load(arch: Arch, suite: str = DEFAULT_SUITE, verify: bool = True) -> Image | None:
    """The cached image, or None when it is missing, partial or fails its checksums."""
    d = image_dir(arch, suite)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("guest") != guest_digest():
        return None
    if not files_intact(d, manifest["files"], full=verify):
        return None
    img = Image(d, arch, suite, manifest["krel"], manifest["version"])
    if not (img.headers / "Makefile").is_file():
        return None
    return img


def ensure(
    arch: Arch | str | None = None, suite: str = DEFAULT_SUITE, mirrors: Mirrors | None = None, rebuild: bool = False
) -> Image:
    """The cached image for ARCH and SUITE, built first if missing or damaged."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    if not rebuild and (img := load(arch, suite, verify=False)):
        return img
    with locked(cache_dir() / "images" / f".{suite}-{arch.name}.lock"):
        if not rebuild and (img := load(arch, suite)):  # another process may have built it
            return img
        if (image_dir(arch, suite) / "manifest.json").exists() and not rebuild:
            progress.warn(f"cached {suite}/{arch.name} image is damaged or from another kbridge version: rebuilding it")
        return _build(arch, suite, mirrors or mirrors_from_env(suite))


def _build(arch: Arch, suite: str, mirrors: Mirrors) -> Image:
    try:
        return _build_from(arch, suite, mirrors, security=True)
    except FetchError:
        if suite in UNRELEASED:
            raise
        # Seen here: a mirror whose bullseye-security lists arm64 packages that its pool
        # does not serve (404), while amd64's download. The point release still boots.
        progress.warn(
            f"Debian {suite}-security's {arch.debian} packages cannot be fetched from "
            f"{mirrors.security}: building from {suite} and {suite}-updates only"
        )
        return _build_from(arch, suite, mirrors, security=False)


def _build_from(arch: Arch, suite: str, mirrors: Mirrors, security: bool) -> Image:
    root = cache_dir()
    final = image_dir(arch, suite)
    tag = "" if security else "-nosecurity"
    with staged(final) as work:
        apt = PrivateApt(root / "apt" / f"{suite}-{arch.debian}{tag}", suite, arch.debian, mirrors, security)
        host_apt = (
            apt
            if host_arch() == arch.name
            else PrivateApt(
                root / "apt" / f"{suite}-{get_arch(None).debian}{tag}", suite, get_arch(None).debian, mirrors, security
            )
        )
        with progress.step(f"reading Debian {suite} package lists ({arch.debian})"):
            apt.update()
            if host_apt is not apt:
                host_apt.update()
        debs = work / "debs"
        with progress.step(f"downloading Debian {suite}'s kernel and headers ({arch.debian})"):
            pkgs = kernelpkgs.kernel_packages(apt, arch)
            kernel_debs = apt.download([*pkgs.binary, *pkgs.headers], debs / "kernel")
            kbuild_debs = host_apt.download(list(pkgs.kbuild), debs / "kbuild")
        krel, version = pkgs.krel, pkgs.version
        with progress.step(f"downloading the guest userspace ({arch.debian})"):
            user_debs = apt.download_closure(["busybox-static", "qemu-guest-agent"], debs / "user")
        with progress.step(f"unpacking kernel {krel} ({version}) and its headers"):
            for deb in kernel_debs + kbuild_debs:
                extract(deb, work / ("headers" if deb.name.startswith(("linux-headers-", "linux-kbuild-")) else "kpkg"))
            modroot = modtree.modroot(work / "kpkg", krel)
            check_config(kernelpkgs.read_config(work / "headers", krel), f"Debian {suite} {arch.name} kernel {krel}")
            kernelpkgs.fix_headers(work / "headers", krel)
            kernelpkgs.install_kernel(arch, kernelpkgs.vmlinuz(work / "kpkg", krel), work / "kernel")
        with progress.step("building the initramfs"):
            sysroot = work / "sysroot"
            for deb in user_debs:
                extract(deb, sysroot)
            build_initramfs(arch, krel, modroot, sysroot, work / "initramfs.cpio")
        for tmp in ("debs", "kpkg", "sysroot"):
            shutil.rmtree(work / tmp)
        files = {rel: sha256(work / rel) for rel in ("kernel", "initramfs.cpio")}
        manifest = {
            "format": FORMAT,
            "guest": guest_digest(),
            "arch": arch.name,
            "suite": suite,
            "krel": krel,
            "version": version,
            "security": security,
            "files": files,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    img = load(arch, suite)
    assert img is not None
    progress.info(f"guest image ready: Debian {suite} {arch.name}, kernel {krel}")
    return img
