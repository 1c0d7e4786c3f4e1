"""kbridge's eBPF probe for a guest, built on the host: the libbpf loader and the CO-RE object.

The eBPF world's way since bcc gave way to libbpf: compile on the host at native speed, load in
the guest. bcc compiled kbridge's program with clang *inside* the emulated guest (10-60 s each
new program under TCG); now nothing is compiled per probe at all.

What runs in the guest (the sources are in kbridge/guest/bpf/):

  kbridge-bpf   loader.c, linked statically against Debian bookworm's libbpf, libelf and zlib for
                the guest's arch (their -dev packages fetched with a private apt state and
                unpacked with dpkg-deb: the host's dpkg is not touched). Once per arch.
  probe.bpf.o   probe.bpf.c, compiled by the host's `clang -target bpf` against the vmlinux.h that
                `bpftool btf dump` makes from the guest kernel's BTF (kbridge.images.btf). CO-RE:
                field offsets are relocated at load time. Once per image. Every probe (symbol,
                offset, filters, arguments) is load-time configuration of this one object.
  min.btf       that BTF cut down to what the object's CO-RE relocations touch (`bpftool gen
                min_core_btf`, a few hundred bytes): the loader's --btf, so libbpf does not parse
                the 4-5 MB /sys/kernel/btf/vmlinux in an emulated guest (3-5x faster loads).

They reach the guest as a second cpio archive after the image's initramfs (the kernel unpacks
concatenated archives), under /usr/lib/kbridge/bpf/DIGEST/, DIGEST naming the sources: a VM boots
with them. A guest booted without them (a Vagrant machine, a VM a host without clang booted) gets
them pushed on its first eBPF probe.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kbridge import progress
from kbridge.arch import Arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images import btf
from kbridge.images.cpio import CpioWriter
from kbridge.images.image import Image
from kbridge.paths import cache_dir

FORMAT = 1  # bump when the build or the guest layout changes
SOURCES = ("probe.bpf.c", "kb_event.h", "loader.c")
SOURCE_DIR = GUEST_DIR / "bpf"
GUEST_ROOT = "/usr/lib/kbridge/bpf"
# The loader's libraries: static archives and headers (libbpf-dev also has bpf_helpers.h and
# bpf_core_read.h for the BPF program). bookworm's libelf 0.188 needs no zstd.
LIB_SUITE = "bookworm"
LIB_PACKAGES = ("libbpf-dev", "libelf-dev", "zlib1g-dev")
HOST_GCC = "12"
LINUX_TOOLS = Path("/usr/lib/linux-tools")  # Ubuntu's per-kernel tools (bpftool before 25.04)
BUILD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class BpfTools:
    """The loader, the object and its minimal BTF for one image, on the host."""

    digest: str
    loader: Path
    obj: Path
    min_btf: Path

    @property
    def guest_dir(self) -> str:
        return f"{GUEST_ROOT}/{self.digest}"

    def guest_files(self) -> list[tuple[str, Path, int]]:
        """(guest path, host file, mode) of each file the guest needs."""
        return [
            (f"{self.guest_dir}/kbridge-bpf", self.loader, 0o755),
            (f"{self.guest_dir}/probe.bpf.o", self.obj, 0o644),
            (f"{self.guest_dir}/min.btf", self.min_btf, 0o644),
        ]


def digest() -> str:
    """What the guest's tools are built from: kbridge's sources (a new digest is a new guest dir)."""
    h = hashlib.sha256(f"{FORMAT}".encode())
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def _bpftool() -> str | None:
    """The host's bpftool binary. Debian's package puts it in /usr/sbin (not on every user's PATH);
    Ubuntu before 25.04 has no bpftool package: linux-tools-common's /usr/sbin/bpftool is a shell
    script that runs the one of the *running* kernel's linux-tools, so the binary linux-tools-generic
    installs under LINUX_TOOLS is used directly (any version dumps and cuts BTF files alike)."""
    found = [shutil.which("bpftool"), shutil.which("bpftool", path="/usr/sbin:/sbin")]
    found += [str(p) for p in sorted(LINUX_TOOLS.glob("*/bpftool"), reverse=True)]
    for path in found:
        if path is not None and _is_elf(path):
            return path
    return None


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _libc_a(arch: Arch) -> Path:
    if host_arch() == arch.name:
        return Path("/usr/lib") / arch.gnu_triplet / "libc.a"
    return Path("/usr") / arch.gnu_triplet / "lib/libc.a"


def host_missing(arch: Arch) -> list[str]:
    """The host packages the build needs and lacks (Debian names), [] when it can build."""
    missing = []
    if shutil.which("clang") is None:
        missing.append("clang")
    if _bpftool() is None:
        missing.append("bpftool")
    if shutil.which(arch.gcc(HOST_GCC)) is None:
        missing.append(arch.gcc_package(HOST_GCC))
    if not _libc_a(arch).is_file():
        missing.append("libc6-dev" if host_arch() == arch.name else f"libc6-dev-{arch.debian}-cross")
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        missing.append("dpkg apt")
    return missing


def _image_dir(image: Image, d: str) -> Path:
    return image.state / f"bpf-{d}"


def _loader_path(arch: Arch, d: str) -> Path:
    return cache_dir() / "bpf" / f"{arch.name}-{d}" / "kbridge-bpf"


def built(image: Image) -> BpfTools | None:
    """IMAGE's tools if they were built already (nothing is built here)."""
    d = digest()
    tools = BpfTools(
        d, _loader_path(image.arch, d), _image_dir(image, d) / "probe.bpf.o", _image_dir(image, d) / "min.btf"
    )
    return tools if all(p.is_file() for _, p, _ in tools.guest_files()) else None


def ensure(image: Image) -> BpfTools:
    """IMAGE's tools, built first where missing (a few seconds, once); a KbridgeError says what is missing."""
    if (tools := built(image)) is not None:
        return tools
    if missing := host_missing(image.arch):
        raise KbridgeError(
            f"cannot build kbridge's eBPF probe for {image.arch.name}: {', '.join(missing)} not installed",
            f"sudo apt-get install {' '.join(missing)}",
        )
    d = digest()
    loader = _build_loader(image.arch, d)
    obj, min_btf = _build_object(image, d)
    (_image_dir(image, d) / "failed").unlink(missing_ok=True)
    return BpfTools(d, loader, obj, min_btf)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KbridgeError(f"{what}: {argv[0]} failed to run: {e}") from None
    if proc.returncode != 0:
        raise KbridgeError(f"{what} failed ({argv[0]}, exit {proc.returncode}):\n{proc.stderr.strip()[-1500:]}")
    return proc.stdout


def _sysroot(arch: Arch) -> Path:
    """Debian bookworm's libbpf-dev, libelf-dev and zlib1g-dev for ARCH, unpacked (fetched once)."""
    from kbridge.images.apt import PrivateApt, extract, mirrors_from_env

    root = cache_dir() / "bpf" / f"sysroot-{arch.debian}"
    if (root / "done").is_file():
        return root
    with _locked(root.with_name(f".{root.name}.lock")):
        if (root / "done").is_file():
            return root
        apt = PrivateApt(
            cache_dir() / "apt" / f"{LIB_SUITE}-{arch.debian}", LIB_SUITE, arch.debian, mirrors_from_env(LIB_SUITE)
        )
        apt.update()
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            debs = apt.download(list(LIB_PACKAGES), work / "debs")
            for deb in debs:
                extract(deb, work / "root")
            (work / "root" / "done").write_text("\n".join(p.name for p in debs) + "\n")
            shutil.rmtree(root, ignore_errors=True)
            (work / "root").rename(root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


def _build_loader(arch: Arch, d: str) -> Path:
    out = _loader_path(arch, d)
    if out.is_file():
        return out
    sysroot = _sysroot(arch)
    with _locked(out.parent.with_name(f".{out.parent.name}.lock")):
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".kbridge-bpf.{os.getpid()}")
        libdir = sysroot / "usr/lib" / arch.gnu_triplet
        _run(
            [
                arch.gcc(HOST_GCC),
                *("-O2", "-Wall", "-static", "-s"),
                *("-I", str(SOURCE_DIR), "-isystem", str(sysroot / "usr/include")),
                *("-isystem", str(sysroot / "usr/include" / arch.gnu_triplet)),
                *("-o", str(tmp), str(SOURCE_DIR / "loader.c")),
                *("-L", str(libdir), "-lbpf", "-lelf", "-lz"),
            ],
            f"building the eBPF loader for {arch.name}",
        )
        tmp.replace(out)
    return out


def vmlinux_h(image: Image) -> Path:
    """The C header of IMAGE's kernel types, from its BTF (bpftool btf dump), made once per image."""
    d = image.state / "btf"
    out = d / "vmlinux.h"
    if out.is_file():
        return out
    bpftool = _bpftool()
    if bpftool is None:
        raise KbridgeError("bpftool is not installed", "sudo apt-get install bpftool")
    d.mkdir(parents=True, exist_ok=True)
    raw = d / "vmlinux.btf"
    if not raw.is_file():
        tmp = raw.with_name(f".vmlinux.btf.{os.getpid()}")
        tmp.write_bytes(btf.extract(image.kernel.read_bytes()))
        tmp.replace(raw)
    tmp = out.with_name(f".vmlinux.h.{os.getpid()}")
    tmp.write_text(_run([bpftool, "btf", "dump", "file", str(raw), "format", "c"], "dumping the kernel's BTF as C"))
    tmp.replace(out)
    return out


def _build_object(image: Image, d: str) -> tuple[Path, Path]:
    outdir = _image_dir(image, d)
    obj, min_btf = outdir / "probe.bpf.o", outdir / "min.btf"
    if obj.is_file() and min_btf.is_file():
        return obj, min_btf
    with _locked(image.state / ".bpf.lock"):
        if obj.is_file() and min_btf.is_file():
            return obj, min_btf
        header = vmlinux_h(image)
        sysroot = _sysroot(image.arch)
        outdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=outdir))
        try:
            # -g: clang emits BTF and the CO-RE relocations (.BTF.ext) from the debug info.
            _run(
                [
                    "clang",
                    *("-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{image.arch.bpf_target}"),
                    *("-I", str(header.parent), "-I", str(SOURCE_DIR), "-isystem", str(sysroot / "usr/include")),
                    *("-c", str(SOURCE_DIR / "probe.bpf.c"), "-o", str(tmp / "probe.bpf.o")),
                ],
                f"compiling kbridge's eBPF probe for {image.arch.name} {image.krel}",
            )
            bpftool = _bpftool()
            assert bpftool is not None  # vmlinux_h() needed it
            _run(
                [
                    bpftool,
                    "gen",
                    "min_core_btf",
                    str(header.parent / "vmlinux.btf"),
                    str(tmp / "min.btf"),
                    str(tmp / "probe.bpf.o"),
                ],
                "cutting the kernel's BTF down to the probe's relocations",
            )
            (tmp / "min.btf").replace(min_btf)
            (tmp / "probe.bpf.o").replace(obj)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return obj, min_btf


def boot_initrd(image: Image) -> Path:
    """The initramfs a VM of IMAGE boots: the image's, followed by the eBPF tools when this host can build
    them (built here the first time, a few seconds); the image's alone when it cannot."""
    if not image.arch.bpf_target:
        return image.initramfs  # no eBPF probe for this arch (kbridge.arch)
    tools = built(image)
    if tools is None:
        failed = _image_dir(image, digest()) / "failed"
        if host_missing(image.arch) or failed.exists():
            return image.initramfs  # --via bpf says what is missing, and builds or pushes them then
        try:
            with progress.step(f"building kbridge's eBPF loader and probe for {image.arch.name} {image.krel} (once)"):
                tools = ensure(image)
        except KbridgeError as e:
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(e.message + "\n")
            progress.warn(f"the guest boots without kbridge's eBPF probe: {e.message.splitlines()[0]}")
            return image.initramfs
    out = _image_dir(image, tools.digest) / "initrd.cpio"  # the state dir goes with a rebuilt image
    if out.is_file():
        return out
    tmp = out.with_name(f".initrd.{os.getpid()}")
    with tmp.open("wb") as f:
        with image.initramfs.open("rb") as src:
            shutil.copyfileobj(src, f)
        w = CpioWriter(f)
        for guest, host, mode in tools.guest_files():
            w.file(guest, host.read_bytes(), mode)
        w.close()
    tmp.replace(out)
    return out
