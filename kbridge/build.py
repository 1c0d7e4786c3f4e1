"""Build a rendered module with kbuild against an image's headers, cached by content.

The cache key is the rendered source + kernel release + arch, so an unchanged
probe is never rebuilt, and a module is checked against the target's vermagic
before use, so a stale one is never loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kbridge import buildroot, elf, kernels, progress
from kbridge.errors import KbridgeError
from kbridge.images.image import Image
from kbridge.paths import cache_dir
from kbridge.render.kmod import ModuleSource

_GCC_DIAG = re.compile(r"^(?P<file>[^:\s]+\.c):(?P<line>\d+):(?P<col>\d+): (?P<kind>error|warning): (?P<msg>.*)$")


class BuildError(KbridgeError):
    """kbuild failed; the message shows each compiler error with the generated line."""


def cache_key(mod: ModuleSource, image: Image) -> str:
    return hashlib.sha256(f"{mod.digest()}|{image.krel}|{image.arch.name}|{image.version}".encode()).hexdigest()[:24]


HOST_GCC = "12"  # the host's (bookworm's) gcc, which builds bullseye's and bookworm's modules


def uses_build_root(image: Image) -> bool:
    """True when IMAGE's kernel needs its suite's own compiler (trixie, sid), see kbridge.buildroot."""
    suite = kernels.SUITES.get(image.suite)
    return suite is not None and not suite.host_gcc


def kbuild_argv(image: Image, moddir: Path) -> list[str]:
    """make -C <headers> M=<moddir> ARCH=... CROSS_COMPILE=... modules (an argv, never a shell string).

    bullseye's headers ask for gcc-10 (CC in .kernelvariables): the host's gcc-12 builds
    modules that load on 5.10, so CC is overridden. trixie (gcc-14) and sid (gcc-16) run
    make inside their suite's build root (made on first use) with the headers as shipped.
    """
    arch = image.arch
    if uses_build_root(image):
        headers_tree = (image.dir / "headers").resolve()
        root = buildroot.ensure(image.suite, arch, headers_tree)
        # Inside the root the host is still host_arch(): same CROSS_COMPILE rule.
        argv = [
            "make",
            "-s",
            "-C",
            f"{buildroot.HEADERS_AT}/usr/src/linux-headers-{image.krel}",
            f"M={buildroot.MODULE_AT}",
            f"ARCH={arch.kernel_arch}",
            f"CROSS_COMPILE={arch.cross_compile()}",
            "modules",
        ]
        return buildroot.wrap(root, headers_tree, moddir, argv)
    return [
        "make",
        "-s",
        "-C",
        str(image.headers),
        f"M={moddir}",
        f"ARCH={arch.kernel_arch}",
        f"CROSS_COMPILE={arch.cross_compile()}",
        f"CC={arch.cross_compile()}gcc-{HOST_GCC}",
        "modules",
    ]


def build(mod: ModuleSource, image: Image) -> Path:
    """The built .ko for MOD on IMAGE's kernel, from the cache when the source is unchanged."""
    out = cache_dir() / "modules" / cache_key(mod, image) / f"{mod.name}.ko"
    if out.is_file():
        try:
            check_vermagic(out.read_bytes(), image.krel)
            return out
        except KbridgeError:
            shutil.rmtree(out.parent, ignore_errors=True)  # stale or damaged: rebuild
    missing = [t for t in ("make", f"{image.arch.cross_compile()}gcc-{HOST_GCC}") if shutil.which(t) is None]
    if missing and not uses_build_root(image):
        pkg = "gcc-12" if not image.arch.cross_compile() else f"gcc-12-{image.arch.gnu_triplet}"
        raise KbridgeError(
            f"cannot build modules: {', '.join(missing)} not found",
            f"sudo apt-get install make {pkg} (kbridge doctor checks the rest)",
        )
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{mod.name}-", dir=out.parent.parent))
    try:
        for fname, text in mod.files.items():
            (work / fname).write_text(text)
        with progress.step(f"building {mod.name}.ko for {image.krel}"):
            proc = subprocess.run(
                kbuild_argv(image, work), capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
            )
        if proc.returncode != 0:
            raise BuildError(
                explain_build_failure(proc.stdout + proc.stderr, mod),
                "this is a kbridge template bug if your input was accepted: please report it",
            )
        ko = work / f"{mod.name}.ko"
        check_vermagic(ko.read_bytes(), image.krel)
        # Debug info is most of a module's size; the guest needs none of it.
        subprocess.run([f"{image.arch.cross_compile()}objcopy", "--strip-debug", str(ko)], check=False)
        work.rename(out.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def explain_build_failure(output: str, mod: ModuleSource) -> str:
    """Compiler errors, each followed by the generated source line it points at."""
    lines = mod.source.splitlines()
    shown = []
    for raw in output.splitlines():
        m = _GCC_DIAG.match(raw.strip())
        if m and m["kind"] == "error":
            n = int(m["line"])
            src = lines[n - 1] if 0 < n <= len(lines) else ""
            shown.append(f"{mod.name}.c:{n}: error: {m['msg']}\n    {n} | {src.strip()}")
    body = "\n".join(shown) if shown else output.strip()[-2000:]
    return f"building {mod.name}.ko failed:\n{body}"


def check_vermagic(ko: bytes, krel: str) -> str:
    """The module's vermagic, if it was built for KREL; otherwise a KbridgeError."""
    vermagic = elf.modinfo(ko).get("vermagic", "")
    if vermagic.split(" ", 1)[0] != krel:
        raise KbridgeError(
            f"module vermagic {vermagic!r} does not match the guest kernel {krel}",
            "it was built for another kernel; kbridge rebuilds it",
        )
    return vermagic
