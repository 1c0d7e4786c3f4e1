"""The default guest image: a Debian kernel, its headers and a busybox + qemu-guest-agent initramfs.

(Over 500 lines: one build, package closure -> kernel -> modules -> initramfs -> manifest, read
top to bottom; the apt and cpio pieces are files of their own.)

Built once per (suite, arch) from Debian packages into the cache, in a temporary
directory that is renamed into place only when complete; a manifest with SHA-256
sums is written last, so a partial or corrupted image is detected and rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kbridge import kernels, progress
from kbridge.arch import Arch, get_arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images.apt import UNRELEASED, FetchError, Mirrors, PrivateApt, extract, host_mirrors
from kbridge.images.cpio import CpioWriter
from kbridge.paths import cache_dir

if TYPE_CHECKING:
    from kbridge.kprobe_events import Grammar

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
    if not files_intact(d, manifest["files"], full=verify):
        return None
    img = Image(d, arch, suite, manifest["krel"], manifest["version"])
    if not (img.headers / "Makefile").is_file():
        return None
    return img


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
            if _sha256(d / rel) != digest:
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
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure(
    arch: Arch | str | None = None, suite: str = DEFAULT_SUITE, mirrors: Mirrors | None = None, rebuild: bool = False
) -> Image:
    """The cached image for ARCH and SUITE, built first if missing or damaged."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    if not rebuild and (img := load(arch, suite, verify=False)):
        return img
    with _locked(cache_dir() / "images" / f".{suite}-{arch.name}.lock"):
        if not rebuild and (img := load(arch, suite)):  # another process may have built it
            return img
        if (image_dir(arch, suite) / "manifest.json").exists() and not rebuild:
            progress.warn(f"cached {suite}/{arch.name} image is damaged or from another kbridge version: rebuilding it")
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


@dataclass(frozen=True)
class KernelPackages:
    """Which packages carry one Debian kernel: its binary and modules, and its kbuild tree."""

    krel: str
    version: str
    binary: tuple[str, ...]  # vmlinuz, modules, System.map/config (sid splits these in three)
    headers: tuple[str, ...]  # the arch headers and the -common tree
    kbuild: tuple[str, ...]  # linux-kbuild-*: host programs, so fetched for the host's arch


def kernel_packages(apt: PrivateApt, arch: Arch) -> KernelPackages:
    """Follow the arch's kernel metapackage (linux-image-amd64, -arm64, -armmp) to the packages of its kernel.

    Up to trixie the versioned linux-image-KREL holds vmlinuz and modules; sid (7.x)
    made it a metapackage of linux-binary-KREL (vmlinuz), linux-modules-KREL and
    linux-base-KREL (System.map, config, modules.builtin).
    """
    meta = arch.kernel_package
    image_pkg = next((d for d in apt.depends(meta) if re.fullmatch(r"linux-image-\d.*", d)), None)
    if image_pkg is None:
        raise KbridgeError(
            f"no kernel package behind {meta} in Debian {apt.suite}",
            "the suite may not carry a kernel for this architecture",
        )
    krel = image_pkg.removeprefix("linux-image-").removesuffix("-unsigned")
    binary = [image_pkg] + [
        d for d in apt.depends(image_pkg) if d.startswith(("linux-binary-", "linux-modules-", f"linux-base-{krel}"))
    ]
    headers_pkg = f"linux-headers-{krel}"
    deps = apt.depends(headers_pkg)
    common = [d for d in deps if d.startswith("linux-headers-")]
    kbuild = [d for d in deps if d.startswith("linux-kbuild-")]
    return KernelPackages(krel, apt.version(image_pkg), tuple(binary), (headers_pkg, *common), tuple(kbuild))


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
            pkgs = kernel_packages(apt, arch)
            kernel_debs = apt.download([*pkgs.binary, *pkgs.headers], debs / "kernel")
            kbuild_debs = host_apt.download(list(pkgs.kbuild), debs / "kbuild")
        krel, version = pkgs.krel, pkgs.version
        with progress.step(f"downloading the guest userspace ({arch.debian})"):
            user_debs = apt.download_closure(["busybox-static", "qemu-guest-agent"], debs / "user")
        with progress.step(f"unpacking kernel {krel} ({version}) and its headers"):
            for deb in kernel_debs + kbuild_debs:
                extract(deb, work / ("headers" if deb.name.startswith(("linux-headers-", "linux-kbuild-")) else "kpkg"))
            modroot = _modroot(work / "kpkg", krel)
            check_config(_read_config(work / "headers", krel), f"Debian {suite} {arch.name} kernel {krel}")
            fix_headers(work / "headers", krel)
            _install_kernel(arch, _vmlinuz(work / "kpkg", krel), work / "kernel")
        with progress.step("building the initramfs"):
            sysroot = work / "sysroot"
            for deb in user_debs:
                extract(deb, sysroot)
            _build_initramfs(arch, krel, modroot, sysroot, work / "initramfs.cpio")
        for tmp in ("debs", "kpkg", "sysroot"):
            shutil.rmtree(work / tmp)
        files = {rel: _sha256(work / rel) for rel in ("kernel", "initramfs.cpio")}
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


def _kernel_package(apt: PrivateApt, arch: Arch) -> str:
    """The versioned linux-image-KREL package behind the arch's kernel metapackage."""
    pkgs = kernel_packages(apt, arch)
    return pkgs.binary[0]


def _modroot(kpkg: Path, krel: str) -> Path:
    """lib/modules/KREL, or usr/lib/modules/KREL where the packages are /usr-merged (trixie on)."""
    for cand in (kpkg / "lib/modules" / krel, kpkg / "usr/lib/modules" / krel):
        if (cand / "modules.builtin").is_file():
            return cand
    raise KbridgeError(f"kernel {krel}: no modules.builtin in its packages (unexpected layout)")


def _vmlinuz(kpkg: Path, krel: str) -> Path:
    """boot/vmlinuz-KREL, or (sid, linux-binary-KREL) usr/lib/modules/KREL/vmlinuz."""
    for cand in (kpkg / "boot" / f"vmlinuz-{krel}", kpkg / "usr/lib/modules" / krel / "vmlinuz"):
        if cand.is_file():
            return cand
    raise KbridgeError(f"kernel {krel}: no vmlinuz in its packages (unexpected layout)")


def _read_config(tree: Path, krel: str) -> dict[str, str]:
    return parse_config((tree / "usr/src" / f"linux-headers-{krel}" / ".config").read_text())


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_* = value pairs of a kernel .config ('is not set' lines are left out)."""
    out = {}
    for ln in text.splitlines():
        if ln.startswith("CONFIG_") and "=" in ln:
            k, _, v = ln.partition("=")
            out[k] = v.strip('"')
    return out


# What kbridge needs of a kernel: kprobes, and the tracefs kprobe_events for `trace`.
REQUIRED_CONFIG = ("CONFIG_KPROBES", "CONFIG_MODULES", "CONFIG_KPROBE_EVENTS")


def check_config(config: dict[str, str], what: str) -> None:
    """A KbridgeError naming the first option kbridge needs that the kernel lacks."""
    for opt in REQUIRED_CONFIG:
        if config.get(opt) != "y":
            raise KbridgeError(
                f"{what} was built without {opt}: kbridge cannot probe it",
                "choose another --kernel (kbridge image list shows the matrix)",
            )


def fix_headers(tree: Path, krel: str) -> None:
    """Point the headers' Makefile at the private -common tree instead of /usr/src.

    The path is relative (make -C runs in the headers directory), so the tree can move.
    sid's headers also set KBUILD_OUTPUT=/usr/src/linux-headers-KREL: it becomes the
    directory make runs in.
    """
    makefile = tree / "usr/src" / f"linux-headers-{krel}" / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(r"include /usr/src/", "include ../", text)
    fixed = re.sub(r"(?m)^KBUILD_OUTPUT\s*:?=\s*/usr/src/\S+$", "KBUILD_OUTPUT := $(CURDIR)", fixed)
    if not re.search(r"^include \.\./", fixed, re.M) or "/usr/src/" in fixed:
        raise KbridgeError(f"unexpected headers Makefile for {krel}: {text.strip()!r}")
    makefile.write_text(fixed)


def _install_kernel(arch: Arch, vmlinuz: Path, dest: Path) -> None:
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
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        # zstd (trixie and later); the kernel appends the decompressed size (4 bytes).
        data = _unzstd(payload[:-4])
    elif payload.startswith(b"\x1f\x8b"):
        import zlib

        data = zlib.decompressobj(31).decompress(payload)
    else:
        raise KbridgeError(f"unsupported bzImage compression (magic {payload[:4].hex()})")
    if not data.startswith(b"\x7fELF"):
        raise KbridgeError("bzImage payload is not an ELF vmlinux")
    return data


def _unzstd(data: bytes) -> bytes:
    if shutil.which("zstd") is None:
        raise KbridgeError("this kernel is zstd-compressed and zstd is not installed", "sudo apt-get install zstd")
    proc = subprocess.run(["zstd", "-d", "-q", "-c"], input=data, capture_output=True)
    if proc.returncode != 0:
        raise KbridgeError(f"zstd could not unpack the kernel: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_bytes(path: Path) -> bytes:
    """A module file's ELF bytes; trixie and sid ship them xz-compressed (CONFIG_MODULE_COMPRESS_XZ)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return _unzstd(data)
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    return data


def _module_name(path: Path) -> str:
    name = path.name
    for suf in MODULE_SUFFIXES[::-1]:
        if name.endswith(suf):
            return name[: -len(suf)].replace("-", "_")
    return name


def module_closure(modroot: Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[Path]:
    """The .ko files for NAMES and their dependencies, dependencies first; built-ins skipped.

    Names in OPTIONAL are left out when the kernel has no such module (e.g.
    crc32c_generic, gone in 6.14 when ext4 moved to the crc32c library).
    """
    builtin = {Path(line).stem.replace("-", "_") for line in (modroot / "modules.builtin").read_text().split()}
    by_name = {_module_name(p): p for suf in MODULE_SUFFIXES for p in modroot.rglob("*" + suf)}
    order: list[Path] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in builtin or by_name.get(name) in order:
            return
        if name not in by_name:
            raise KbridgeError(f"guest kernel has no module {name!r} (and it is not built in)")
        from kbridge import elf  # pyelftools: only to build an image

        deps = elf.modinfo(module_bytes(by_name[name]), name).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep)
        order.append(by_name[name])

    for n in names:
        if n in optional and n.replace("-", "_") not in by_name:
            continue
        visit(n)
    return order


def _build_initramfs(arch: Arch, krel: str, modroot: Path, sysroot: Path, out: Path) -> None:
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


def module_list(paths: list[str]) -> bytes:
    """/etc/kbridge/modules: one module path a line, and an empty file for none (a kernel with its
    virtio drivers built in): the init's `while read` would read one empty line and insmod ''."""
    return "".join(f"{p}\n" for p in paths).encode()


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


def fetch_dbg_vmlinux(img: Image, mirrors: Mirrors | None = None) -> Path:
    """IMG's vmlinux with DWARF, from Debian's linux-image-KREL-dbg (~860 MB for 6.1: only vmlinux is
    unpacked, streamed out of the package), into the image's gdb/ directory."""
    import tarfile

    dest = img.dir / "gdb" / "vmlinux"
    if dest.is_file():
        return dest
    package = f"linux-image-{img.krel}-dbg"
    apt = PrivateApt(
        cache_dir() / "apt" / f"{img.suite}-{img.arch.debian}",
        img.suite,
        img.arch.debian,
        mirrors or _mirrors_from_env(img.suite),
    )
    with progress.step(f"reading Debian {img.suite} package lists ({img.arch.debian})"):
        apt.update()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with progress.step(f"downloading {package} ({apt.version(package)})"):
            (deb,) = apt.download([package], Path(tmp))
        with progress.step(f"unpacking its vmlinux into {dest.parent}"):
            proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            found = False
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith((f"/boot/vmlinux-{img.krel}", f"/{img.krel}/vmlinux")):
                        src = tar.extractfile(member)
                        assert src is not None
                        part = Path(tmp) / "vmlinux"
                        with part.open("wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
                        part.rename(dest)
                        found = True
                        break
            proc.stdout.close()
            proc.kill()
            proc.wait()
    if not found:
        raise KbridgeError(f"{package} has no vmlinux (unexpected layout)")
    return dest


def grammar(img: Image | None, arch: Arch, suite: str) -> Grammar:
    """The kprobe_events grammar of IMG's kernel (its .config and release), else SUITE's from the table."""
    from kbridge.kprobe_events import grammar_for  # the grammar tables: only commands that parse event lines

    if img is not None and (cfg := img.config).is_file():
        return grammar_for(suite, arch, _config_file(str(cfg), cfg.stat().st_mtime_ns), img.krel)
    return grammar_for(suite, arch)


def grammar_of(arch: Arch, suite: str) -> Grammar:
    """The grammar of the kernel kbridge boots on ARCH for SUITE (a kernel key): its built image's,
    else the table's (the debug kernel's and a tree's: bookworm's until built or laid out)."""
    if not kernels.is_debian(suite):
        from kbridge.images import debugkernel, kerneltree

        tree = kernels.tree_of(suite)
        img = debugkernel.load(arch) if tree is None else kerneltree.load_dir(kerneltree.image_dir(tree, arch), arch)
        return grammar(img, arch, suite)
    return grammar(load(arch, suite, verify=False), arch, suite)


@functools.lru_cache(maxsize=16)  # read for every line checked: parsed once per file version
def _config_file(path: str, mtime_ns: int) -> dict[str, str]:
    return parse_config(Path(path).read_text())
