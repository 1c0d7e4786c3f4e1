"""The kernel of a machine kbridge did not build (a Vagrant user's own box): its facts and headers.

kbridge's own images carry their kernel's headers. A machine's own kernel gets an Image
too: a directory keyed by its release and /proc/version, holding what kbridge learns
about it (state/: symbols, the kprobe blacklist), its .config when the guest has one
(the kprobe_events grammar) and, on the first module build only, its headers:

  1. the guest's own /lib/modules/KREL/build, copied out once (Debian's layout: the arch
     tree, the -common tree its Makefile includes, and linux-kbuild's programs);
  2. else Debian's linux-headers-KREL from the guest's suite, fetched as kbridge fetches
     the headers of its own images;
  3. else a one-line refusal naming the command that installs them in the guest.

kbuild's programs (fixdep, modpost) run on the host: for a guest of another arch they
come from Debian's linux-kbuild for the host's arch, whichever way the headers came.
tracefs, `inspect`, `vm exec` and file transfers need none of this.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kbridge import kernels, progress
from kbridge.arch import Arch, get_arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.images.apt import Mirrors, PrivateApt, extract, host_mirrors
from kbridge.images.cache import staged
from kbridge.images.image import Image
from kbridge.images.kconfig import check_config, parse_config
from kbridge.images.kernelpkgs import fix_headers
from kbridge.paths import cache_dir


@dataclass(frozen=True)
class GuestKernel:
    """What a running guest says about its kernel."""

    arch: Arch
    krel: str  # uname -r
    version: str  # /proc/version: tells two builds of one release apart
    os_id: str = ""  # /etc/os-release ID (debian, ubuntu, ...)
    codename: str = ""  # VERSION_CODENAME (bookworm, ...)
    package: str = (
        ""  # the kernel's Debian package and version ("linux-image-6.1.0-9-amd64 6.1.27-1"), if dpkg knows it
    )

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.arch.name}\0{self.krel}\0{self.version}".encode()).hexdigest()[:12]

    @property
    def suite(self) -> str:
        """The Debian suite whose compiler and grammar fit (the guest's own, else kbridge's default)."""
        return self.codename if self.os_id == "debian" and self.codename in kernels.SUITES else kernels.DEFAULT

    @property
    def debian(self) -> bool:
        return self.os_id == "debian" and bool(self.codename)


def kernel_dir(kernel: GuestKernel) -> Path:
    return cache_dir() / "foreign" / f"{kernel.arch.name}-{kernel.krel}-{kernel.digest}"


def image_for(kernel: GuestKernel, fetch_headers: Callable[[Image], None], config: bytes | None = None) -> Image:
    """KERNEL's Image (created on first use); FETCH_HEADERS gets its headers when a build needs them."""
    d = kernel_dir(kernel)
    (d / "state").mkdir(parents=True, exist_ok=True)
    about = d / "kernel.json"
    if not about.is_file():
        about.write_text(json.dumps(kernel.__dict__ | {"arch": kernel.arch.name}, indent=1))
    if config and not (d / "config").is_file():
        check_config(parse_config(config.decode(errors="replace")), f"the kernel {kernel.krel}")
        (d / "config").write_bytes(config)
    return Image(d, kernel.arch, kernel.suite, kernel.krel, kernel.digest, fetch_headers=fetch_headers)


def install_hint(kernel: GuestKernel, machine: str) -> str:
    """How a user installs the headers in the machine (the one thing kbridge cannot do for them)."""
    if kernel.os_id in ("debian", "ubuntu"):
        return (
            f"install them in the machine: vagrant ssh {machine} -c 'sudo apt-get install linux-headers-$(uname -r)', "
            "then run this again"
        )
    return (
        f"install the kernel headers package of its distribution in the machine (vagrant ssh {machine}), "
        "the one that provides /lib/modules/$(uname -r)/build, then run this again"
    )


# -- 1. the guest's own headers ----------------------------------------------------------

# What to copy out of a Debian guest for KREL (paths relative to /): the tree
# /lib/modules/KREL/build points at, the -common tree its Makefile includes, and the
# linux-kbuild tree its scripts link into. Printed one per line by the guest.
GUEST_TREES = r"""
b=$(readlink -f "/lib/modules/$1/build") || exit 3
[ -f "$b/Makefile" ] || exit 3
echo "${b#/}"
c=$(sed -n 's|^include \(/usr/src/[^/]*\)/Makefile$|\1|p' "$b/Makefile")
[ -n "$c" ] && [ -d "$c" ] && echo "${c#/}"
k=$(readlink -f "$b/scripts" 2>/dev/null) && [ "$k" != "$b/scripts" ] && echo "${k%/scripts}" | sed 's|^/||'
true
"""


def from_guest_tar(img: Image, data: bytes, mirrors: Mirrors | None = None) -> None:
    """IMG's headers from a tar of the guest's trees (GUEST_TREES), made to build on this host."""
    with staged(img.dir / "headers") as work:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(work, filter="tar")
        tree = work / "usr/src" / f"linux-headers-{img.krel}"
        if not (tree / "Makefile").is_file():
            found = [p.parent for p in (work / "usr/src").glob("*/Makefile")]
            arch_tree = next((p for p in found if (p / ".config").is_file()), None)
            if arch_tree is None:
                raise KbridgeError(f"the guest's headers for {img.krel} have no Makefile with a .config")
            arch_tree.rename(tree)
        fix_headers(work, img.krel)
        if img.arch.name != host_arch() or not _kbuild_runs(tree):
            _host_kbuild(img, work, mirrors)


def _kbuild_runs(tree: Path) -> bool:
    fixdep = tree / "scripts/basic/fixdep"
    return fixdep.is_file() and fixdep.stat().st_mode & 0o111 != 0


def _host_kbuild(img: Image, work: Path, mirrors: Mirrors | None) -> None:
    """Replace the guest's kbuild programs (built for its arch) with Debian's for the host's arch."""
    tree = work / "usr/src" / f"linux-headers-{img.krel}"
    link = tree / "scripts"
    target = link.resolve() if link.is_symlink() else None
    m = re.search(r"linux-kbuild-([\d.]+)", str(target or ""))
    if m is None:
        raise KbridgeError(
            f"the guest's headers for {img.krel} carry kbuild programs built for {img.arch.name}, which "
            "cannot run on this host, and no Debian linux-kbuild package to replace them",
            "build the module in the machine itself, or use a machine of the host's arch",
        )
    host = get_arch(None)
    apt = PrivateApt(
        cache_dir() / "apt" / f"{img.suite}-{host.debian}", img.suite, host.debian, mirrors or host_mirrors(img.suite)
    )
    with progress.step(f"fetching linux-kbuild-{m.group(1)} for the host ({host.debian})"):
        apt.update()
        shutil.rmtree(work / "usr/lib" / f"linux-kbuild-{m.group(1)}", ignore_errors=True)
        for deb in apt.download([f"linux-kbuild-{m.group(1)}"], work / ".debs"):
            extract(deb, work)
        shutil.rmtree(work / ".debs")


# -- 2. Debian's archive -----------------------------------------------------------------


def from_archive(img: Image, kernel: GuestKernel, mirrors: Mirrors | None = None) -> bool:
    """IMG's headers from Debian's linux-headers-KREL of the guest's suite; False when it has none."""
    if not kernel.debian:
        return False
    arch = img.arch
    mirrors = mirrors or host_mirrors(kernel.codename)
    apt = PrivateApt(cache_dir() / "apt" / f"{kernel.codename}-{arch.debian}", kernel.codename, arch.debian, mirrors)
    host = get_arch(None)
    host_apt = (
        apt
        if host.name == arch.name
        else PrivateApt(cache_dir() / "apt" / f"{kernel.codename}-{host.debian}", kernel.codename, host.debian, mirrors)
    )
    headers = f"linux-headers-{kernel.krel}"
    with progress.step(f"looking for {headers} in Debian {kernel.codename} ({arch.debian})"):
        apt.update()
        try:
            version = apt.version(headers)
        except KbridgeError:
            return False
        deps = apt.depends(headers)
    wanted = kernel.package.split()[1:2]
    if wanted and wanted[0] != version:
        # One ABI name, one module interface: Debian renames the release when it changes.
        progress.warn(
            f"{headers}: the archive has {version}, the guest's kernel is {wanted[0]} (same ABI {kernel.krel})"
        )
    with (
        progress.step(f"downloading {headers} ({version}) and its kbuild programs"),
        staged(img.dir / "headers") as work,
    ):
        if host_apt is not apt:
            host_apt.update()
        debs = apt.download([headers, *(d for d in deps if d.startswith("linux-headers-"))], work / ".debs/kernel")
        debs += host_apt.download([d for d in deps if d.startswith("linux-kbuild-")], work / ".debs/kbuild")
        for deb in debs:
            extract(deb, work)
        shutil.rmtree(work / ".debs")
        fix_headers(work, kernel.krel)
    return True


# -- tools a machine may lack ------------------------------------------------------------


def static_busybox(arch: Arch, mirrors: Mirrors | None = None) -> Path:
    """Debian bookworm's static busybox for ARCH (cached): kbridge's commands run busybox applets,
    and a machine without /bin/busybox gets this copy in its /tmp for the connection."""
    out = cache_dir() / "foreign" / f"busybox-{arch.name}"
    if out.is_file():
        return out
    suite = kernels.DEFAULT
    apt = PrivateApt(cache_dir() / "apt" / f"{suite}-{arch.debian}", suite, arch.debian, mirrors or host_mirrors(suite))
    with progress.step(f"fetching Debian's static busybox ({arch.debian}) for a machine without busybox"):
        apt.update()
        with staged(out.with_name(out.name + ".d")) as work:
            for deb in apt.download(["busybox-static"], work / "debs"):
                extract(deb, work / "root")
            found = [p for p in (work / "root/bin/busybox", work / "root/usr/bin/busybox") if p.is_file()]
            if not found:
                raise KbridgeError("Debian's busybox-static package has no bin/busybox (unexpected layout)")
            shutil.copyfile(found[0], out.with_suffix(".tmp"))
            out.with_suffix(".tmp").chmod(0o755)
            out.with_suffix(".tmp").rename(out)
        shutil.rmtree(out.with_name(out.name + ".d"), ignore_errors=True)
    return out
