"""Freestanding guest programs (no libc: kbridge/guest/*.c) built static for an arch, once, cached.

They use no library, so the host's compiler (or its cross build) builds them for every
guest kernel and distribution: the finit_module loader, the agent kbridge runs on a
machine it reaches over SSH.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import tempfile
from pathlib import Path

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.paths import cache_dir

HOST_GCC = "12"  # the host's (bookworm's) gcc and its aarch64 cross build
FLAGS = (
    *("-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-fno-pie", "-no-pie", "-O2", "-s"),
    # 4 KiB segments: arm64's default 64 KiB alignment makes a 13 KiB program 66 KiB.
    *("-Wl,-z,max-page-size=4096", "-Wl,--build-id=none"),
)


def build(source: Path, arch: Arch) -> Path:
    """SOURCE built static for ARCH (cached by its text, the compiler and the flags)."""
    cc = arch.gcc(HOST_GCC)
    text = source.read_bytes()
    digest = hashlib.sha256(text + cc.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / "kbuild" / "programs" / f"{source.stem}-{arch.name}-{digest}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        argv = [cc, *FLAGS, "-o", str(Path(tmp) / "program"), str(source)]
        try:
            proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise KbridgeError(f"{cc} not found", f"sudo apt-get install {arch.gcc_package(HOST_GCC)}") from None
        if proc.returncode != 0:
            raise KbridgeError(f"building {source.name} for {arch.name} failed: {proc.stderr.strip()[-800:]}")
        with contextlib.suppress(FileExistsError):
            (Path(tmp) / "program").rename(out)
    return out
