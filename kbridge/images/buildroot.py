"""Per-suite build roots: the compiler a newer Debian kernel expects, from Debian packages.

kbuild refuses (or miscompiles with) a compiler other than the one the kernel was
built with, and trixie's and sid's linux-kbuild tools need a newer glibc than the
host's. So for those suites kbridge makes a small Debian root (mmdebstrap, apt
variant: gcc-N or its aarch64 cross build, make, the kbuild tools' libraries;
~300 MB, ~30 s, cached per suite, arch and gcc) and runs `make` in it: chroot in a
private mount namespace where the image's headers and the module directory are
bind-mounted, so nothing is copied and the host's mounts never change.

Run as `python -m kbridge.images.buildroot ROOT HEADERS MODDIR -- make ...` (by kbuild_argv
under `unshare --mount`): it binds, chroots and execs the command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from kbridge import progress
from kbridge.arch import Arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.images.apt import Mirrors, host_mirrors
from kbridge.images.cache import locked, staged
from kbridge.paths import cache_dir

FORMAT = 1  # bump when the root's contents change
HEADERS_AT = "/kb/headers"  # where the image's headers tree appears inside the root
MODULE_AT = "/kb/mod"  # where the module's build directory appears
_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")


def kernel_gcc(headers_tree: Path) -> str:
    """The gcc major version a kernel's headers ask for (CC = ...gcc-N in .kernelvariables)."""
    for f in headers_tree.glob("usr/src/linux-headers-*/.kernelvariables"):
        if m := re.search(r"^CC\s*=.*gcc-(\d+)\s*$", f.read_text(), re.M):
            return m.group(1)
    raise KbridgeError(f"cannot tell which gcc the kernel headers in {headers_tree} expect")


def root_dir(suite: str, arch: Arch, gcc: str) -> Path:
    return cache_dir() / "buildroots" / f"{suite}-{arch.name}-gcc{gcc}-on-{host_arch()}"


def packages(arch: Arch, gcc: str, kbuild: str) -> list[str]:
    """What the root holds: make, the arch's gcc-N (cross when foreign), and linux-kbuild-X
    for the libraries its programs link (so a new kbuild upload makes a new root)."""
    cc = arch.gcc_package(gcc)
    # dpkg is there anyway (apt variant); .kernelvariables calls dpkg --print-architecture.
    # pahole: 6.12+ headers ship vmlinux, so kbuild adds BTF to each module (CONFIG_DEBUG_INFO_BTF_MODULES).
    return ["make", cc, kbuild, "dwarves"]


def ensure(suite: str, arch: Arch, headers_tree: Path, mirrors: Mirrors | None = None) -> Path:
    """The build root for SUITE's kernels on ARCH, made first (mmdebstrap) when missing."""
    gcc = kernel_gcc(headers_tree)
    final = root_dir(suite, arch, gcc)
    stamp = final / ".kbridge-root"
    want = f"{FORMAT} {kbuild_package(headers_tree)}"
    if stamp.is_file() and stamp.read_text().strip() == want:
        return final
    with locked(final.parent / f".{final.name}.lock"):
        if stamp.is_file() and stamp.read_text().strip() == want:
            return final
        if shutil.which("mmdebstrap") is None:
            raise KbridgeError(
                f"Debian {suite}'s kernel needs gcc-{gcc}, which kbridge installs into a build root "
                "made with mmdebstrap, and mmdebstrap is not installed",
                "sudo apt-get install mmdebstrap",
            )
        found = host_mirrors(suite)
        m = mirrors or Mirrors(
            os.environ.get("KBRIDGE_MIRROR", found.main), os.environ.get("KBRIDGE_SECURITY_MIRROR", found.security)
        )
        pkgs = packages(arch, gcc, kbuild_package(headers_tree))
        with (
            staged(final) as work,
            progress.step(
                f"making the {suite} build root with gcc-{gcc} for {arch.name} (once, ~300 MB, about a minute)"
            ),
        ):
            argv = [
                "mmdebstrap",
                "--variant=apt",
                "--quiet",
                f"--include={','.join(pkgs)}",
                *(f"--dpkgopt=path-exclude={p}" for p in _EXCLUDES),
                suite,
                str(work),
                *sources(suite, m),
            ]
            proc = _mmdebstrap(argv, work)
            if proc.returncode != 0 and "apt-get update" in proc.stderr:
                # A frozen mirror (or snapshot.debian.org) serves a Release file past its
                # Valid-Until; the host's own apt reads such a mirror with a warning only.
                progress.warn(f"apt could not read {suite} from {m.main}: retrying without Valid-Until checks")
                shutil.rmtree(work)
                work.mkdir()
                argv.insert(1, "--aptopt=Acquire::Check-Valid-Until false")
                proc = _mmdebstrap(argv, work)
            if proc.returncode != 0:
                errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("E: ")]
                tail = "\n".join(errs[:4] or proc.stderr.strip().splitlines()[-6:])
                raise KbridgeError(
                    f"making the {suite} build root failed:\n{tail}",
                    f"check the mirror {m.main} (--mirror or KBRIDGE_MIRROR)",
                )
            for d in (HEADERS_AT, MODULE_AT):
                (work / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
            (work / ".kbridge-root").write_text(want + "\n")
    return final


def _mmdebstrap(argv: list[str], work: Path) -> subprocess.CompletedProcess[str]:
    """Run mmdebstrap; if it is interrupted, unmount what it mounted before the tree is removed."""
    try:
        return subprocess.run(argv, capture_output=True, text=True)
    except BaseException:
        for sub in ("proc", "sys", "dev/pts", "dev"):
            if os.path.ismount(work / sub):
                subprocess.run(["umount", "--lazy", "--recursive", str(work / sub)], check=False)
        raise


def sources(suite: str, m: Mirrors) -> list[str]:
    """mmdebstrap's sources: the kbuild package of a current kernel may be in -security only."""
    from kbridge.images.apt import UNRELEASED

    if suite in UNRELEASED:
        return [f"deb {m.main} {suite} main"]
    return [
        f"deb {m.main} {suite} main",
        f"deb {m.main} {suite}-updates main",
        f"deb {m.security} {suite}-security main",
    ]


def kbuild_package(headers_tree: Path) -> str:
    """linux-kbuild-X of the headers: installed in the root for its libraries (libelf, libssl)."""
    found = sorted(p.name for p in headers_tree.glob("usr/lib/linux-kbuild-*"))
    if not found:
        raise KbridgeError(f"no linux-kbuild tree in {headers_tree}")
    return found[-1]


def make_argv(krel: str, arch: Arch) -> list[str]:
    """kbuild's make inside a root, where the headers are at HEADERS_AT and the module at MODULE_AT.

    Inside the root the host is still host_arch(): the same CROSS_COMPILE rule; the compiler is
    the root's own (the one the suite's kernel was built with), so CC is not overridden.
    """
    return [
        "make",
        "-s",
        "-C",
        f"{HEADERS_AT}/usr/src/linux-headers-{krel}",
        f"M={MODULE_AT}",
        f"ARCH={arch.kernel_arch}",
        f"CROSS_COMPILE={arch.cross_compile()}",
        "modules",
    ]


def wrap(root: Path, headers: Path, moddir: Path, argv: list[str]) -> list[str]:
    """ARGV run inside ROOT with HEADERS and MODDIR bound at HEADERS_AT and MODULE_AT."""
    ns = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        ns.append("--map-root-user")  # an unprivileged user's own namespace may bind and chroot
    return [*ns, sys.executable, "-m", "kbridge.images.buildroot", str(root), str(headers), str(moddir), "--", *argv]


def _main(args: list[str]) -> None:
    root, headers, moddir = (Path(a) for a in args[:3])
    cmd = args[4:]
    binds = [
        (headers, root / HEADERS_AT.lstrip("/")),
        (moddir, root / MODULE_AT.lstrip("/")),
        (Path("/dev"), root / "dev"),
        # sid's objtool reads its stack limit from /proc (read_stack_limit()).
        (Path("/proc"), root / "proc"),
    ]
    for src, dst in binds:
        subprocess.run(["mount", "--rbind", str(src), str(dst)], check=True)
    os.chroot(root)
    os.chdir("/")
    os.execvpe(cmd[0], cmd, {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/"})


if __name__ == "__main__":
    _main(sys.argv[1:])
