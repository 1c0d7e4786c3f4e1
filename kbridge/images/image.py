"""The default guest image: a Debian kernel, its headers and a busybox + qemu-guest-agent initramfs.

Built once per (suite, arch) from Debian packages into the cache, in a temporary
directory that is renamed into place only when complete; a manifest with SHA-256
sums is written last, so a partial or corrupted image is detected and rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kbridge import elf, progress
from kbridge.arch import Arch, get_arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images.apt import Mirrors, PrivateApt, extract, host_mirrors
from kbridge.images.cpio import CpioWriter
from kbridge.paths import cache_dir

DEFAULT_SUITE = "bookworm"
FORMAT = 4  # bump when the image layout changes, so old caches are rebuilt
# Guest drivers the init loads (with their dependencies), for the agent's channel.
GUEST_MODULES = ("virtio_pci", "virtio_console")


@dataclass(frozen=True)
class Image:
    """A built guest image in the cache."""

    dir: Path
    arch: Arch
    suite: str
    krel: str  # the kernel release, `uname -r` in the guest
    version: str  # the Debian package version of the kernel

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
    def state(self) -> Path:
        """Where per-image facts learnt at run time are cached (symbol table, KVM verdict)."""
        return self.dir / "state"


def guest_digest() -> str:
    """A digest of the guest-side files: an image built with other ones is rebuilt."""
    h = hashlib.sha256(str(FORMAT).encode())
    for p in sorted(GUEST_DIR.iterdir()):
        if p.is_file() and not p.name.endswith((".py", ".pyc")):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def image_dir(arch: Arch, suite: str) -> Path:
    return cache_dir() / "images" / f"{suite}-{arch.name}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(arch: Arch, suite: str = DEFAULT_SUITE, verify: bool = True) -> Image | None:
    """The cached image, or None when it is missing, partial or fails its checksums."""
    d = image_dir(arch, suite)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("guest") != guest_digest():
        return None
    for rel, digest in manifest["files"].items():
        p = d / rel
        if not p.is_file() or (verify and _sha256(p) != digest):
            return None
    img = Image(d, arch, suite, manifest["krel"], manifest["version"])
    if not (img.headers / "Makefile").is_file():
        return None
    return img


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure(arch: Arch | str | None = None, suite: str = DEFAULT_SUITE,
           mirrors: Mirrors | None = None, rebuild: bool = False) -> Image:
    """The cached image for ARCH and SUITE, built first if missing or damaged."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    if not rebuild and (img := load(arch, suite, verify=False)):
        return img
    with _locked(cache_dir() / "images" / f".{suite}-{arch.name}.lock"):
        if not rebuild and (img := load(arch, suite)):  # another process may have built it
            return img
        if (image_dir(arch, suite) / "manifest.json").exists() and not rebuild:
            progress.warn(f"cached {suite}/{arch.name} image is damaged or from another kbridge "
                          "version: rebuilding it")
        return _build(arch, suite, mirrors or _mirrors_from_env(suite))


def _mirrors_from_env(suite: str) -> Mirrors:
    found = host_mirrors(suite)
    return Mirrors(
        os.environ.get("KBRIDGE_MIRROR", found.main),
        os.environ.get("KBRIDGE_SECURITY_MIRROR", found.security),
    )


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


def _build(arch: Arch, suite: str, mirrors: Mirrors) -> Image:
    root = cache_dir()
    final = image_dir(arch, suite)
    with staged(final) as work:
        apt = PrivateApt(root / "apt" / f"{suite}-{arch.debian}", suite, arch.debian, mirrors)
        host_apt = apt if host_arch() == arch.name else PrivateApt(
            root / "apt" / f"{suite}-{get_arch(None).debian}", suite, get_arch(None).debian, mirrors)
        with progress.step(f"reading Debian {suite} package lists ({arch.debian})"):
            apt.update()
            if host_apt is not apt:
                host_apt.update()
        image_pkg = _kernel_package(apt, arch)
        krel = image_pkg.removeprefix("linux-image-").removesuffix("-unsigned")
        headers_pkg = f"linux-headers-{krel}"
        deps = apt.depends(headers_pkg)
        common = [d for d in deps if d.startswith("linux-headers-")]
        kbuild = [d for d in deps if d.startswith("linux-kbuild-")]
        version = apt.version(image_pkg)
        debs = work / "debs"
        with progress.step(f"downloading kernel {krel} ({version}), headers and guest userspace"):
            kernel_debs = apt.download([image_pkg, headers_pkg, *common], debs / "kernel")
            kbuild_debs = host_apt.download(kbuild, debs / "kbuild")
            user_debs = apt.download_closure(["busybox-static", "qemu-guest-agent"], debs / "user")
        with progress.step("unpacking kernel and headers"):
            for deb in kernel_debs + kbuild_debs:
                extract(deb, work / ("headers" if "headers" in deb.name or "kbuild" in deb.name else "kpkg"))
            _fix_headers(work / "headers", krel)
            _install_kernel(arch, work / "kpkg", krel, work / "kernel")
        with progress.step("building the initramfs"):
            sysroot = work / "sysroot"
            for deb in user_debs:
                extract(deb, sysroot)
            _build_initramfs(arch, krel, work / "kpkg", sysroot, work / "initramfs.cpio")
        for tmp in ("debs", "kpkg", "sysroot"):
            shutil.rmtree(work / tmp)
        files = {rel: _sha256(work / rel) for rel in ("kernel", "initramfs.cpio")}
        manifest = {"format": FORMAT, "guest": guest_digest(), "arch": arch.name, "suite": suite, "krel": krel,
                    "version": version, "files": files}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    img = load(arch, suite)
    assert img is not None
    progress.info(f"guest image ready: Debian {suite} {arch.name}, kernel {krel}")
    return img


def _kernel_package(apt: PrivateApt, arch: Arch) -> str:
    """Follow the linux-image-ARCH metapackage to the versioned kernel package."""
    for dep in apt.depends(f"linux-image-{arch.debian}"):
        if re.fullmatch(r"linux-image-\d.*", dep):
            return dep
    raise KbridgeError(f"no kernel package behind linux-image-{arch.debian} in {apt.suite}")


def _fix_headers(tree: Path, krel: str) -> None:
    """Point the headers' one-line Makefile at the private -common tree instead of /usr/src.

    The path is relative (make -C runs in the headers directory), so the tree can move.
    """
    makefile = tree / "usr/src" / f"linux-headers-{krel}" / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(r"include /usr/src/", "include ../", text)
    if fixed == text:
        raise KbridgeError(f"unexpected headers Makefile for {krel}: {text.strip()!r}")
    makefile.write_text(fixed)


def _install_kernel(arch: Arch, kpkg: Path, krel: str, dest: Path) -> None:
    vmlinuz = kpkg / "boot" / f"vmlinuz-{krel}"
    if arch.direct_vmlinux:
        # The ELF vmlinux inside the bzImage boots directly through its PVH entry
        # (CONFIG_PVH), skipping the decompressor: seconds saved under TCG.
        dest.write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
    else:
        shutil.copyfile(vmlinuz, dest)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux from an x86 bzImage whose payload is xz or gzip compressed."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise KbridgeError("kernel image is not an x86 bzImage")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if payload.startswith(b"\xfd7zXZ"):
        data = lzma.LZMADecompressor().decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        import zlib
        data = zlib.decompressobj(31).decompress(payload)
    else:
        raise KbridgeError(f"unsupported bzImage compression (magic {payload[:4].hex()})")
    if not data.startswith(b"\x7fELF"):
        raise KbridgeError("bzImage payload is not an ELF vmlinux")
    return data


def module_closure(modroot: Path, names: tuple[str, ...]) -> list[Path]:
    """The .ko files for NAMES and their dependencies, dependencies first; built-ins skipped."""
    builtin = {Path(line).stem for line in (modroot / "modules.builtin").read_text().split()}
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p for p in modroot.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in builtin or by_name.get(name) in order:
            return
        if name not in by_name:
            raise KbridgeError(f"guest kernel has no module {name!r} (and it is not built in)")
        deps = elf.modinfo(by_name[name].read_bytes(), name).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep)
        order.append(by_name[name])

    for n in names:
        visit(n)
    return order


def _build_initramfs(arch: Arch, krel: str, kpkg: Path, sysroot: Path, out: Path) -> None:
    with out.open("wb") as f:
        w = CpioWriter(f)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc/kbridge"):
            w.dir(d)
        w.chardev("dev/console", 5, 1)  # the kernel opens it for init's stdio before devtmpfs
        w.chardev("dev/null", 1, 3)
        w.copy("bin/busybox", sysroot / "bin/busybox")
        w.file("init", (GUEST_DIR / "init").read_bytes(), 0o755)
        w.file("usr/lib/kbridge/stream", (GUEST_DIR / "stream").read_bytes(), 0o755)
        _copy_with_libs(w, sysroot, "usr/sbin/qemu-ga")
        modroot = kpkg / "lib/modules" / krel
        listed = []
        for ko in module_closure(modroot, GUEST_MODULES):
            rel = ko.relative_to(kpkg).as_posix()
            w.copy(rel, ko)
            listed.append("/" + rel)
        w.file("etc/kbridge/modules", ("\n".join(listed) + "\n").encode())
        w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        w.file("etc/group", b"root:x:0:\n")
        w.close()


def _copy_with_libs(w: CpioWriter, sysroot: Path, rel: str) -> None:
    """Copy a dynamically linked program and its library closure (DT_NEEDED) from SYSROOT."""
    search = [d for d in ("lib", "usr/lib") for d in (f"{d}/{_multiarch(sysroot)}", d)]
    pending = [rel]
    seen: set[str] = set()
    while pending:
        cur = pending.pop()
        if cur in seen:
            continue
        seen.add(cur)
        data = _inside(sysroot, cur).read_bytes()
        w.file(cur, data, 0o755)
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
        if not p.is_symlink():
            return p
        target = os.readlink(p)
        rel = os.path.normpath(target.lstrip("/") if target.startswith("/")
                               else os.path.join(os.path.dirname(rel), target))
    raise KbridgeError(f"symlink loop at {rel} in the guest packages")


def _multiarch(sysroot: Path) -> str:
    for cand in (sysroot / "lib").iterdir():
        if cand.is_dir() and cand.name.endswith("-linux-gnu"):
            return cand.name
    raise KbridgeError("guest libc not found in the unpacked packages")
