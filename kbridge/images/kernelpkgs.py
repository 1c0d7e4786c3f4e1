"""A Debian kernel's packages and what an image takes from them: the kernel file and the headers.

The arch's kernel metapackage is followed to the versioned packages of one kernel; once
unpacked, its vmlinuz becomes the image's kernel and its headers' Makefile is pointed at
the private -common tree.
"""

from __future__ import annotations

import lzma
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images.apt import PrivateApt
from kbridge.images.kconfig import parse_config


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


def kernel_package(apt: PrivateApt, arch: Arch) -> str:
    """The versioned linux-image-KREL package behind the arch's kernel metapackage."""
    pkgs = kernel_packages(apt, arch)
    return pkgs.binary[0]


def vmlinuz(kpkg: Path, krel: str) -> Path:
    """boot/vmlinuz-KREL, or (sid, linux-binary-KREL) usr/lib/modules/KREL/vmlinuz."""
    for cand in (kpkg / "boot" / f"vmlinuz-{krel}", kpkg / "usr/lib/modules" / krel / "vmlinuz"):
        if cand.is_file():
            return cand
    raise KbridgeError(f"kernel {krel}: no vmlinuz in its packages (unexpected layout)")


def read_config(tree: Path, krel: str) -> dict[str, str]:
    return parse_config((tree / "usr/src" / f"linux-headers-{krel}" / ".config").read_text())


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


def install_kernel(arch: Arch, vmlinuz: Path, dest: Path) -> None:
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
        data = unzstd(payload[:-4])
    elif payload.startswith(b"\x1f\x8b"):
        import zlib

        data = zlib.decompressobj(31).decompress(payload)
    else:
        raise KbridgeError(f"unsupported bzImage compression (magic {payload[:4].hex()})")
    if not data.startswith(b"\x7fELF"):
        raise KbridgeError("bzImage payload is not an ELF vmlinux")
    return data


def unzstd(data: bytes) -> bytes:
    """DATA unpacked by the zstd program (trixie on compresses the kernel and its modules with it)."""
    if shutil.which("zstd") is None:
        raise KbridgeError("this kernel is zstd-compressed and zstd is not installed", "sudo apt-get install zstd")
    proc = subprocess.run(["zstd", "-d", "-q", "-c"], input=data, capture_output=True)
    if proc.returncode != 0:
        raise KbridgeError(f"zstd could not unpack the kernel: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
