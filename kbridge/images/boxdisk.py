"""What a box boots: its root filesystem written file by file, as ext4 in qcow2, and its initrd.

The package closure is unpacked with dpkg-deb -x (no chroot, no maintainer scripts, so an
arm64 box needs no qemu-user emulation). What the maintainer scripts would have done that
matters here is done by hand: users and groups, the PAM stacks sudo includes, sshd's
configuration, /bin/sh. The initrd is the embedded image's initramfs followed by a second
archive whose /init mounts /dev/vda and switches to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images.apt import PrivateApt, extract
from kbridge.images.cpio import CpioWriter
from kbridge.images.ext4 import make_ext4
from kbridge.images.image import Image
from kbridge.images.modtree import module_closure

BOX_GUEST_DIR = GUEST_DIR / "box"
# Loaded by the initramfs to reach the root filesystem (crc32c_generic: ext4/jbd2 ask the
# crypto API for crc32c and there is no modprobe; crc32c-intel does not load under TCG).
DISK_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
# Loaded by the box's init: the NIC, packet sockets for the DHCP client.
BOOT_MODULES = ("virtio_net", "af_packet")
_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/lintian")
DISK_GB = 4  # the guest's root filesystem size (sparse: the qcow2 holds only what is used)
VAGRANT_UID = 1000


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


def install_modules(kpkg: Path, rootfs: Path, krel: str) -> list[str]:
    """Copy the kernel's module tree minus drivers a box never loads; the boot list (in order)."""
    src = kpkg / "lib/modules" / krel
    dst = rootfs / "lib/modules" / krel
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    listed = []
    for ko in module_closure(src, DISK_MODULES + BOOT_MODULES):
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


def configure(rootfs: Path, arch: Arch, krel: str, key: str, modules: list[str], bcc_common: list[str] | None) -> None:
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


def mkfs(rootfs: Path, out: Path) -> None:
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


def qcow2(raw: Path, out: Path) -> None:
    if shutil.which("qemu-img") is None:
        raise KbridgeError(
            "qemu-img is not installed (it makes the box's qcow2 disk)", "sudo apt-get install qemu-utils"
        )
    proc = subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KbridgeError(f"qemu-img convert failed: {proc.stderr.strip()}")


def initrd(base: Image, kpkg: Path, krel: str, out: Path) -> None:
    """The image's initramfs (busybox) plus an archive whose /init mounts the box disk.

    The kernel unpacks concatenated archives in order, so the later /init and module
    list replace the image's.
    """
    modroot = kpkg / "lib/modules" / krel
    with out.open("wb") as f:
        f.write(base.initramfs.read_bytes())
        w = CpioWriter(f)
        listed = []
        for ko in module_closure(modroot, DISK_MODULES):
            rel = ko.relative_to(kpkg).as_posix()
            w.copy(rel, ko)
            listed.append("/" + rel)
        w.file("etc/kbridge/modules", ("\n".join(listed) + "\n").encode())
        w.file("init", (BOX_GUEST_DIR / "initramfs-init").read_bytes(), 0o755)
        w.close()
