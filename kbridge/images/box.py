"""Vagrant boxes (libvirt provider) from the same Debian packages as the embedded image.

A box is built like the images: a private apt state, the package closure unpacked
with dpkg-deb -x, configuration files written directly (boxdisk.py: the root
filesystem, its disk and the initrd). Adding it to Vagrant and removing it again are
vagrantboxes.py's.

  box.img        a partitionless ext4 root filesystem as qcow2: the Debian kernel's
                 modules (pruned to the drivers the box loads), busybox, kmod,
                 openssh-server, sudo, a `vagrant` user with Vagrant's insecure key,
                 busybox init (no systemd: a faster boot under TCG); with --bcc also
                 python3-bpfcc and the kernel headers it compiles against
  kernel         the embedded image's kernel (direct boot, no boot loader)
  initrd         the embedded image's initramfs followed by a second archive whose
                 /init mounts /dev/vda and switches to it
  Vagrantfile    the provider settings the box needs (kernel, initrd, cmdline, and on
                 arm64 the `virt` machine without input devices)
  metadata.json  provider libvirt, format qcow2
  manifest.json  written last: a box without it is partial and is rebuilt

The kernel release equals the embedded image's, so modules built against that
image's headers load in the box.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kbridge import progress
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.images.apt import Mirrors, PrivateApt, extract, mirrors_from_env
from kbridge.images.boxdisk import (
    BOX_GUEST_DIR,
    DISK_GB,
    configure,
    initrd,
    insecure_key,
    install_modules,
    mkfs,
    qcow2,
)
from kbridge.images.cache import locked, staged
from kbridge.images.kernelpkgs import kernel_package
from kbridge.paths import cache_dir

FORMAT = 1  # bump when the box layout changes, so old boxes are rebuilt
# The userspace Vagrant and kbridge need: a login shell and the tools Vagrant's Linux
# guest capabilities call (sed, grep, mktemp, scp), sshd, sudo, insmod/rmmod, busybox.
PACKAGES = (
    "base-files",
    "bash",
    "coreutils",
    "dash",
    "diffutils",
    "findutils",
    "grep",
    "gzip",
    "hostname",
    "iproute2",
    "kmod",
    "mount",
    "procps",
    "sed",
    "tar",
    "util-linux",
    "busybox",
    "openssh-server",
    "sudo",
)
BCC_PACKAGES = ("python3-bpfcc",)


@dataclass(frozen=True)
class Box:
    """A built box in the cache."""

    dir: Path
    arch: Arch
    suite: str
    krel: str
    bcc: bool
    version: str  # the box version `vagrant box add` registers

    @property
    def name(self) -> str:
        """The name `vagrant box add` registers it under (the Vagrantfile's config.vm.box)."""
        return box_name(self.arch, self.suite, self.bcc)


def box_name(arch: Arch, suite: str = images.DEFAULT_SUITE, bcc: bool = False) -> str:
    return f"kbridge/{suite}-{arch.name}" + ("-bcc" if bcc else "")


def box_dir(arch: Arch, suite: str = images.DEFAULT_SUITE, bcc: bool = False) -> Path:
    return cache_dir() / "boxes" / (f"{suite}-{arch.name}" + ("-bcc" if bcc else ""))


def cmdline(arch: Arch) -> str:
    """The box kernel's command line: the initramfs ignores root=, Vagrant users expect it."""
    return f"root=/dev/vda rw console={arch.console} net.ifnames=0 quiet"


def load(arch: Arch, suite: str = images.DEFAULT_SUITE, bcc: bool = False) -> Box | None:
    """The cached box, or None when missing, partial or built from another image or layout."""
    d = box_dir(arch, suite, bcc)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("guest") != _guest_digest() or "version" not in manifest:
        return None
    if not all((d / f).is_file() for f in ("box.img", "metadata.json", "Vagrantfile", "kernel", "initrd")):
        return None
    return Box(d, arch, suite, manifest["krel"], bool(manifest.get("bcc")), manifest["version"])


def ensure(
    arch: Arch | str | None = None,
    suite: str = images.DEFAULT_SUITE,
    bcc: bool = False,
    mirrors: Mirrors | None = None,
    rebuild: bool = False,
) -> Box:
    """The box for ARCH, built (about a minute) when missing, partial or stale."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    if arch.box_refusal:
        raise KbridgeError(arch.box_refusal, f"use the embedded VM: kbridge vm up --arch {arch.name}")
    if not rebuild and (box := load(arch, suite, bcc)):
        return box
    base = images.ensure(arch, suite, mirrors)
    with locked(cache_dir() / "boxes" / f".{box_dir(arch, suite, bcc).name}.lock"):
        if not rebuild and (box := load(arch, suite, bcc)):
            return box
        _build(arch, suite, bcc, base, mirrors or mirrors_from_env(suite))
    box = load(arch, suite, bcc)
    if box is None:
        raise KbridgeError(f"the {box_name(arch, suite, bcc)} box did not validate after building")
    return box


def _guest_digest() -> str:
    """The box-side files and the base image's guest files: a change rebuilds the box."""
    import hashlib

    h = hashlib.sha256(f"{FORMAT}:{images.guest_digest()}".encode())
    for p in sorted(BOX_GUEST_DIR.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _build(arch: Arch, suite: str, bcc: bool, base: images.Image, mirrors: Mirrors) -> None:
    final = box_dir(arch, suite, bcc)
    with staged(final) as work:
        apt = PrivateApt(cache_dir() / "apt" / f"{suite}-{arch.debian}", suite, arch.debian, mirrors)
        with progress.step(f"reading Debian {suite} package lists ({arch.debian})"):
            apt.update()
        image_pkg = kernel_package(apt, arch)
        krel = image_pkg.removeprefix("linux-image-").removesuffix("-unsigned")
        if krel != base.krel:
            raise KbridgeError(
                f"Debian {suite} now has kernel {krel}, the cached image has {base.krel}",
                f"rebuild the image first: kbridge image build --arch {arch.name} --rebuild",
            )
        debs = work / "debs"
        wanted = list(PACKAGES) + (list(BCC_PACKAGES) if bcc else [])
        kernel_pkgs = [image_pkg]
        common: list[str] = []
        if bcc:  # bcc compiles against the installed headers (no CONFIG_IKHEADERS)
            common = [d for d in apt.depends(f"linux-headers-{krel}") if d.startswith("linux-headers-")]
            kernel_pkgs += [f"linux-headers-{krel}", *common]
        with progress.step(f"downloading the box's packages ({arch.debian}, kernel {krel})"):
            user = apt.download_closure(wanted, debs / "user")
            kernel = apt.download(kernel_pkgs, debs / "kernel")
            key = insecure_key(apt, debs / "key")
        rootfs = work / "rootfs"
        with progress.step(f"unpacking {len(user) + len(kernel)} packages into the box root filesystem"):
            for deb in user:
                extract(deb, rootfs)
            kpkg = work / "kpkg"
            for deb in kernel:
                extract(deb, kpkg if deb.name.startswith("linux-image") else rootfs)
            listed = install_modules(kpkg, rootfs, krel)
            configure(rootfs, arch, krel, key, listed, common if bcc else None)
        with progress.step("building the box disk (ext4 -> qcow2) and initrd"):
            raw = work / "rootfs.ext4"
            mkfs(rootfs, raw)
            qcow2(raw, work / "box.img")
            raw.unlink()
            initrd(base, kpkg, krel, work / "initrd")
            shutil.copyfile(base.kernel, work / "kernel")
        for tmp in ("debs", "kpkg", "rootfs"):
            shutil.rmtree(work / tmp)
        (work / "metadata.json").write_text(
            json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GB})
        )
        (work / "Vagrantfile").write_text(box_vagrantfile(arch))
        (work / "manifest.json").write_text(
            json.dumps(
                {
                    "format": FORMAT,
                    "guest": _guest_digest(),
                    "arch": arch.name,
                    "suite": suite,
                    "krel": krel,
                    "bcc": bcc,
                    "packages": wanted,
                    "name": box_name(arch, suite, bcc),
                    # Vagrant (and vagrant-libvirt's volume in the storage pool) key a box by name and
                    # version: a rebuilt box gets a new version, so no machine starts from a stale one.
                    "version": f"0.{FORMAT}.{int(time.time())}",
                },
                indent=1,
            )
        )
    progress.info(f"box ready: {box_name(arch, suite, bcc)} (kernel {krel})")


def box_vagrantfile(arch: Arch) -> str:
    """The box's own Vagrantfile: direct kernel boot and what the machine type needs."""
    lines = [
        "# kbridge box: direct kernel boot of the Debian kernel, root on /dev/vda (no boot loader).",
        'Vagrant.configure("2") do |config|',
        '  config.vm.synced_folder ".", "/vagrant", disabled: true',
        "  config.vm.provider :libvirt do |lv|",
        "    dir = File.dirname(File.expand_path(__FILE__))",
        '    lv.kernel = File.join(dir, "kernel")',
        '    lv.initrd = File.join(dir, "initrd")',
        f'    lv.cmd_line = "{cmdline(arch)}"',
        '    lv.graphics_type = "none"',
    ]
    if arch.libvirt_machine:
        lines.append("    # This machine type has no PS/2 or USB input and no x86 features (apic, pae).")
        lines += [f'    lv.{key} = "{value}"' for key, value in arch.libvirt_machine]
        lines += [f'    lv.emulator_path = "/usr/bin/{arch.qemu_binary}"', "    lv.inputs = []", "    lv.features = []"]
    lines += ["  end", "end", ""]
    return "\n".join(lines)
