"""Vagrant boxes (libvirt provider) from the same Debian packages as the embedded image.

(Over 500 lines: a box is a root filesystem written by hand, file by file, in place of the
maintainer scripts; each step is short and they only make sense in order.)

A box is built like the images: a private apt state, the package closure unpacked
with dpkg-deb -x (no chroot, no maintainer scripts, so an arm64 box needs no
qemu-user emulation), configuration files written directly. What the maintainer
scripts would have done that matters here is done by hand: users and groups, the
PAM stacks sudo includes, sshd's configuration, /bin/sh.

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
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kbridge import progress
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images import image as images
from kbridge.images.apt import Mirrors, PrivateApt, extract
from kbridge.images.cpio import CpioWriter
from kbridge.images.ext4 import make_ext4
from kbridge.paths import cache_dir

FORMAT = 1  # bump when the box layout changes, so old boxes are rebuilt
BOX_GUEST_DIR = GUEST_DIR / "box"
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
# Loaded by the initramfs to reach the root filesystem (crc32c_generic: ext4/jbd2 ask the
# crypto API for crc32c and there is no modprobe; crc32c-intel does not load under TCG).
DISK_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
# Loaded by the box's init: the NIC, packet sockets for the DHCP client.
BOOT_MODULES = ("virtio_net", "af_packet")
_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/lintian")
DISK_GB = 4  # the guest's root filesystem size (sparse: the qcow2 holds only what is used)
VAGRANT_UID = 1000


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
    with images._locked(cache_dir() / "boxes" / f".{box_dir(arch, suite, bcc).name}.lock"):
        if not rebuild and (box := load(arch, suite, bcc)):
            return box
        _build(arch, suite, bcc, base, mirrors or images._mirrors_from_env(suite))
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


def insecure_key(apt: PrivateApt, scratch: Path) -> str:
    """Vagrant's insecure public key, from the host's vagrant package or Debian's."""
    found = sorted(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-*/keys/vagrant.pub"))
    if not found:
        for deb in apt.download(["vagrant"], scratch):
            extract(deb, scratch / "vagrant")
        found = sorted((scratch / "vagrant").rglob("keys/vagrant.pub"))
    if not found:
        raise KbridgeError("Vagrant's insecure public key (keys/vagrant.pub) was not found in Debian's vagrant package")
    return found[-1].read_text().strip()


def _build(arch: Arch, suite: str, bcc: bool, base: images.Image, mirrors: Mirrors) -> None:
    final = box_dir(arch, suite, bcc)
    with images.staged(final) as work:
        apt = PrivateApt(cache_dir() / "apt" / f"{suite}-{arch.debian}", suite, arch.debian, mirrors)
        with progress.step(f"reading Debian {suite} package lists ({arch.debian})"):
            apt.update()
        image_pkg = images._kernel_package(apt, arch)
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
            listed = _install_modules(kpkg, rootfs, krel)
            _configure(rootfs, arch, krel, key, listed, common if bcc else None)
        with progress.step("building the box disk (ext4 -> qcow2) and initrd"):
            raw = work / "rootfs.ext4"
            _mkfs(rootfs, raw)
            _qcow2(raw, work / "box.img")
            raw.unlink()
            _initrd(base, kpkg, krel, work / "initrd")
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


def _install_modules(kpkg: Path, rootfs: Path, krel: str) -> list[str]:
    """Copy the kernel's module tree minus drivers a box never loads; the boot list (in order)."""
    src = kpkg / "lib/modules" / krel
    dst = rootfs / "lib/modules" / krel
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    listed = []
    for ko in images.module_closure(src, DISK_MODULES + BOOT_MODULES):
        rel = ko.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ko, dst / rel)
        listed.append(f"/lib/modules/{krel}/{rel.as_posix()}")
    return listed


_PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
sshd:x:100:65534::/run/sshd:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
vagrant:x:1000:1000:vagrant:/home/vagrant:/bin/bash
"""
_GROUP = """root:x:0:
daemon:x:1:
adm:x:4:vagrant
tty:x:5:
sudo:x:27:vagrant
shadow:x:42:
utmp:x:43:
staff:x:50:
nogroup:x:65534:
vagrant:x:1000:
"""
# "*": no password, but not locked ("!"), so sshd accepts the public key without PAM.
_SHADOW = "".join(f"{u}:*:19700:0:99999:7:::\n" for u in ("root", "daemon", "sshd", "nobody", "vagrant"))
# What pam-auth-update (a maintainer script) would generate: sudo's PAM file includes these.
_PAM = {
    "common-auth": "auth [success=1 default=ignore] pam_unix.so nullok\nauth requisite pam_deny.so\n"
    "auth required pam_permit.so\n",
    "common-account": "account [success=1 new_authtok_reqd=done default=ignore] pam_unix.so\n"
    "account requisite pam_deny.so\naccount required pam_permit.so\n",
    "common-password": "password [success=1 default=ignore] pam_unix.so obscure yescrypt\n"
    "password requisite pam_deny.so\npassword required pam_permit.so\n",
    "common-session": "session [default=1] pam_permit.so\nsession requisite pam_deny.so\n"
    "session required pam_permit.so\nsession required pam_unix.so\n",
}
_PAM["common-session-noninteractive"] = _PAM["common-session"]


def _configure(rootfs: Path, arch: Arch, krel: str, key: str, modules: list[str], bcc_common: list[str] | None) -> None:
    """Write what dpkg's maintainer scripts and a first boot would have set up."""
    for rel in _PRUNE:
        shutil.rmtree(rootfs / rel, ignore_errors=True)
    etc = rootfs / "etc"
    for d in (
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "home",
        "var/log",
        "var/tmp",
        "var/lib/sudo",
        "etc/kbridge",
        "etc/sudoers.d",
        "usr/lib/kbridge/box",
        "sys/kernel/debug",
    ):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "var/tmp").chmod(0o1777)
    (rootfs / "root").chmod(0o700)
    (etc / "passwd").write_text(_PASSWD)
    (etc / "group").write_text(_GROUP)
    (etc / "shadow").write_text(_SHADOW)
    (etc / "shadow").chmod(0o640)
    (etc / "hostname").write_text("kbridge\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 kbridge\n::1 localhost ip6-localhost\n")
    (etc / "fstab").write_text("# the initramfs mounts /dev/vda on /; /usr/lib/kbridge/box/rcS mounts the rest\n")
    for name, text in _PAM.items():
        (etc / "pam.d" / name).write_text(text)
    sudoers = etc / "sudoers.d/vagrant"
    # !use_pty: sudo then execs no relay process between sshd and the command.
    sudoers.write_text("Defaults:vagrant !use_pty\nvagrant ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    shutil.copyfile(BOX_GUEST_DIR / "sshd_config", etc / "ssh/sshd_config")
    shutil.copyfile(BOX_GUEST_DIR / "inittab", etc / "inittab")
    (etc / "kbridge/modules").write_text(
        "".join(m + "\n" for m in modules if not any(f"/{d}.ko" in m for d in DISK_MODULES))
    )
    for name in ("rcS", "udhcpc", "shutdown"):
        _install(BOX_GUEST_DIR / name, rootfs / "usr/lib/kbridge/box" / name)
    _install(GUEST_DIR / "stream", rootfs / "usr/lib/kbridge/stream")
    _install(BOX_GUEST_DIR / "shutdown-cmd", rootfs / "sbin/shutdown")
    # Links the maintainer scripts (dash, mawk alternatives) or an init package would make.
    for link, target in (
        ("bin/sh", "dash"),
        ("usr/bin/awk", "mawk"),
        ("sbin/init", "/bin/busybox"),
        ("sbin/poweroff", "/bin/busybox"),
        ("sbin/reboot", "/bin/busybox"),
        ("sbin/halt", "/bin/busybox"),
    ):
        p = rootfs / link
        if not p.exists() and not p.is_symlink():
            os.symlink(target, p)
    if not (rootfs / "bin/busybox").is_file() or not (rootfs / "usr/sbin/sshd").is_file():
        raise KbridgeError("busybox or sshd is missing from the unpacked box packages")
    home = rootfs / "home/vagrant"
    shutil.copytree(etc / "skel", home, dirs_exist_ok=True)
    (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
    (home / ".ssh/authorized_keys").write_text(key + "\n")
    (home / ".ssh/authorized_keys").chmod(0o600)
    if bcc_common is not None:
        mods = rootfs / "lib/modules" / krel
        headers = f"/usr/src/linux-headers-{krel}"
        for link, target in (("build", headers), ("source", f"/usr/src/{bcc_common[0]}" if bcc_common else headers)):
            if not (mods / link).is_symlink():
                os.symlink(target, mods / link)
    (rootfs / "etc/kbridge/box.json").write_text(
        json.dumps({"arch": arch.name, "krel": krel, "bcc": bcc_common is not None}) + "\n"
    )


def _install(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    shutil.copyfile(src, dst)
    dst.chmod(0o755)


def _mkfs(rootfs: Path, out: Path) -> None:
    """A partitionless ext4 of ROOTFS, owned by root except the vagrant user's home.

    mkfs.ext4 -d copies the builder's ownership: when not run as root, every file is
    given to root afterwards with debugfs, and sudo gets back its setuid bit (which
    an unprivileged dpkg-deb -x does not keep).
    """
    used = sum(p.lstat().st_size for p in rootfs.rglob("*"))
    mb = max(DISK_GB * 1024, int(used * 1.5 / 2**20) + 512)
    if os.geteuid() == 0:
        for p in [rootfs / "home/vagrant", *(rootfs / "home/vagrant").rglob("*")]:
            os.lchown(p, VAGRANT_UID, VAGRANT_UID)
    make_ext4(rootfs, out, mb, "kbridge-box", "box")
    if os.geteuid() != 0:
        cmds = []
        for p in rootfs.rglob("*"):
            rel = "/" + p.relative_to(rootfs).as_posix()
            owner = VAGRANT_UID if rel.startswith("/home/vagrant") else 0
            cmds += [f'sif "{rel}" uid {owner}', f'sif "{rel}" gid {owner}']
        cmds.append('sif "/usr/bin/sudo" mode 0104755')
        with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
            script.write("\n".join(cmds) + "\n")
            script.flush()
            proc = subprocess.run(["debugfs", "-w", "-f", script.name, str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KbridgeError(f"debugfs could not set ownership in the box filesystem: {proc.stderr.strip()[-300:]}")


def _qcow2(raw: Path, out: Path) -> None:
    if shutil.which("qemu-img") is None:
        raise KbridgeError(
            "qemu-img is not installed (it makes the box's qcow2 disk)", "sudo apt-get install qemu-utils"
        )
    proc = subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KbridgeError(f"qemu-img convert failed: {proc.stderr.strip()}")


def _initrd(base: images.Image, kpkg: Path, krel: str, out: Path) -> None:
    """The image's initramfs (busybox) plus an archive whose /init mounts the box disk.

    The kernel unpacks concatenated archives in order, so the later /init and module
    list replace the image's.
    """
    modroot = kpkg / "lib/modules" / krel
    with out.open("wb") as f:
        f.write(base.initramfs.read_bytes())
        w = CpioWriter(f)
        listed = []
        for ko in images.module_closure(modroot, DISK_MODULES):
            rel = ko.relative_to(kpkg).as_posix()
            w.copy(rel, ko)
            listed.append("/" + rel)
        w.file("etc/kbridge/modules", ("\n".join(listed) + "\n").encode())
        w.file("init", (BOX_GUEST_DIR / "initramfs-init").read_bytes(), 0o755)
        w.close()


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


def vagrant_add(box: Box) -> None:
    """`vagrant box add` BOX under its name and version, unless Vagrant already has it.

    Added through a catalog (metadata JSON naming the .box archive), which is how a box
    gets a version without a server. The catalog stays in the box's cache directory:
    Vagrant reads it again on every `vagrant up` (its update check), so a catalog that
    was only temporary would make each later `vagrant up` warn that it cannot open it.
    """
    if shutil.which("vagrant") is None:
        raise KbridgeError("vagrant is not installed", "sudo apt-get install vagrant vagrant-libvirt")
    catalog = box.dir / "catalog.json"
    if box.version in added_boxes().get(box.name, []):
        _keep_catalog(box, catalog)
        return
    with tempfile.TemporaryDirectory(prefix="kbridge-box-", dir=box.dir) as tmp:
        archive = Path(tmp) / f"{box.dir.name}.box"
        with tarfile.open(archive, "w") as tar:
            for f in ("metadata.json", "Vagrantfile", "box.img", "kernel", "initrd"):
                tar.add(box.dir / f, arcname=f)
        _write_catalog(box, catalog, archive)
        proc = subprocess.run(
            ["vagrant", "box", "add", "--provider", "libvirt", str(catalog)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    if proc.returncode != 0:
        why = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise KbridgeError(f"vagrant box add {box.name} failed: {why}")


def _write_catalog(box: Box, catalog: Path, archive: Path) -> None:
    # The archive is gone once added: Vagrant needs it only to download a version it lacks, and
    # kbridge adds every version it builds.
    entry = {"version": box.version, "providers": [{"name": "libvirt", "url": archive.as_uri()}]}
    catalog.write_text(json.dumps({"name": box.name, "versions": [entry]}))


def vagrant_home() -> Path:
    return Path(os.environ.get("VAGRANT_HOME") or Path.home() / ".vagrant.d")


def _keep_catalog(box: Box, catalog: Path) -> None:
    """A box added before its catalog was kept (Vagrant's record points at a vanished temporary one):
    point that record at the cache's catalog."""
    record = vagrant_home() / "boxes" / box.name.replace("/", "-VAGRANTSLASH-") / "metadata_url"
    try:
        url = record.read_text().strip()
    except OSError:
        return
    if url == str(catalog) and catalog.is_file():
        return
    if not Path(url.removeprefix("file://")).is_file():
        _write_catalog(box, catalog, box.dir / f"{box.dir.name}.box")
        record.write_text(str(catalog))


def added_boxes() -> dict[str, list[str]]:
    """Boxes Vagrant knows (in VAGRANT_HOME): name -> versions; empty when vagrant is missing."""
    if shutil.which("vagrant") is None:
        return {}
    proc = subprocess.run(
        ["vagrant", "box", "list", "--machine-readable"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    found: dict[str, list[str]] = {}
    names: list[str] = []
    versions: list[str] = []
    for line in proc.stdout.splitlines():
        parts = line.split(",", 3)
        if len(parts) == 4 and parts[2] == "box-name":
            names.append(parts[3])
        elif len(parts) == 4 and parts[2] == "box-version":
            versions.append(parts[3])
    for name, version in zip(names, versions, strict=False):
        found.setdefault(name, []).append(version)
    return found


# -- removing boxes ----------------------------------------------------------------------
# vagrant-libvirt copies a box's disk into libvirt's storage pool on the first `vagrant up`
# (volume NAME_vagrant_box_image_VERSION_box.img) and `vagrant box remove` leaves it there:
# kbridge removes both, and only what no machine uses (Vagrant refuses a box in use).

POOL = "default"  # vagrant-libvirt's storage_pool_name


def _virsh(*args: str) -> subprocess.CompletedProcess[str]:
    uri = os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def box_volumes(name: str) -> dict[str, str]:
    """libvirt's volumes of box NAME in vagrant-libvirt's pool: volume -> box version."""
    if shutil.which("virsh") is None:
        return {}
    proc = _virsh("vol-list", POOL)
    prefix = name.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"
    found = {}
    for line in proc.stdout.splitlines():
        vol = line.split()[0] if line.split() else ""
        if vol.startswith(prefix):
            found[vol] = vol[len(prefix) :].rsplit("_", 1)[0]
    return found


def remove_version(name: str, version: str | None) -> list[str]:
    """Remove VERSION (None: every version) of box NAME from Vagrant, then its libvirt volumes.

    What was done, one phrase each. A version a machine still uses is refused by
    Vagrant: KbridgeError, with its volume left in place.
    """
    done: list[str] = []
    known = added_boxes().get(name, [])
    wanted = [v for v in ([version] if version else known) if v in known]
    users = [m for m in machines_using(name) if version is None or m[1] == version]
    if users:
        machine, v, where = users[0]
        raise KbridgeError(
            f"{name} {v} is used by the Vagrant machine {machine!r} ({where}): nothing removed",
            f"vagrant destroy {machine} (in {where}) first",
        )
    for v in wanted:
        proc = subprocess.run(
            ["vagrant", "box", "remove", name, "--box-version", v, "--provider", "libvirt", "--force"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise KbridgeError(f"vagrant box remove {name} {v} failed: {' '.join(proc.stderr.split())[-300:]}")
        done.append(f"Vagrant's {name} {v}")
    left = set(added_boxes().get(name, []))
    for vol, v in box_volumes(name).items():
        if (version is None or v == version) and v not in left:
            proc = _virsh("vol-delete", "--pool", POOL, vol)
            if proc.returncode != 0:
                raise KbridgeError(f"libvirt kept the volume {vol}: {proc.stderr.strip()[-300:]}")
            done.append(f"libvirt's volume {vol}")
    return done


def machines_using(name: str) -> list[tuple[str, str, str]]:
    """Vagrant machines made from box NAME, from Vagrant's machine index: (machine, version, directory)."""
    try:
        index = json.loads((vagrant_home() / "data/machine-index/index").read_text())
    except (OSError, ValueError):
        return []
    found = []
    for m in (index.get("machines") or {}).values():
        b = (m.get("extra_data") or {}).get("box") or {}
        if b.get("name") == name:
            found.append((str(m.get("name")), str(b.get("version")), str(m.get("vagrantfile_path"))))
    return found


def remove(arch: Arch, suite: str = images.DEFAULT_SUITE, bcc: bool = False, keep_cache: bool = False) -> list[str]:
    """Box ARCH (every version) out of Vagrant, libvirt's pool and (unless KEEP_CACHE) kbridge's cache."""
    name = box_name(arch, suite, bcc)
    done = remove_version(name, None)
    d = box_dir(arch, suite, bcc)
    if not keep_cache and d.exists():
        shutil.rmtree(d)
        done.append(f"the build in {d}")
    return done


def prune() -> list[str]:
    """Every version of kbridge's boxes but the one built now, out of Vagrant and libvirt's pool."""
    from kbridge.arch import ARCHES

    done: list[str] = []
    for arch in ARCHES.values():
        for bcc in (False, True):
            name = box_name(arch, images.DEFAULT_SUITE, bcc)
            current = load(arch, images.DEFAULT_SUITE, bcc)
            versions = set(added_boxes().get(name, [])) | set(box_volumes(name).values())
            for v in sorted(versions - {current.version if current else ""}):
                done += remove_version(name, v)
    return done
