"""A Vagrant box made the way public Debian boxes are, not by kbridge: for the test of a user's own box.

No box catalog is reachable from the test machines, so the box is built here from
Debian's packages: mmdebstrap installs them with apt (maintainer scripts and all)
into a root filesystem with systemd as init, Debian's own kernel package (its
initramfs made by initramfs-tools), openssh-server, sudo, a `vagrant` user with
Vagrant's insecure key, and systemd-networkd's DHCP on eth0. No busybox, no kernel
headers, nothing of kbridge's. Its kernel is bookworm's point release (main and
-updates, no -security): another kernel than kbridge's own image. The disk is a
partitionless ext4 as qcow2; the box's Vagrantfile boots its kernel and initrd
directly (no boot loader). Cached by the recipe; maintainer scripts need the host's
arch, so x86_64 only on an x86_64 host.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from kbridge.arch import Arch, host_arch
from kbridge.images.apt import host_mirrors
from kbridge.paths import cache_dir

PACKAGES = ("systemd-sysv", "udev", "openssh-server", "sudo", "kmod", "procps", "iproute2", "dbus")
NETWORK = "[Match]\nName=eth0\n\n[Network]\nDHCP=yes\n"
NAME = "test/debian12-{arch}"


def _insecure_key() -> str:
    found = sorted(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-*/keys/vagrant.pub"))
    if not found:
        raise RuntimeError("Vagrant's insecure key (keys/vagrant.pub) is missing: install vagrant")
    return found[-1].read_text().strip()


def _recipe(arch: Arch) -> str:
    text = json.dumps([arch.debian, PACKAGES, NETWORK, Path(__file__).read_text()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_debian_box(arch: Arch) -> tuple[Path, str]:
    """The .box file (built once per recipe) and the name to add it under."""
    if arch.name != host_arch():
        raise RuntimeError("apt runs the packages' maintainer scripts: the box is built for the host's arch only")
    d = cache_dir() / "test-boxes" / f"debian12-{arch.name}-{_recipe(arch)}"
    box = d / "debian12.box"
    name = NAME.format(arch=arch.name)
    if box.is_file():
        return box, name
    shutil.rmtree(d, ignore_errors=True)
    work = d.with_name(d.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    root = work / "rootfs"
    mirror = host_mirrors("bookworm").main
    key = _insecure_key()
    hooks = [
        'chroot "$1" useradd -m -s /bin/bash -G sudo vagrant',
        'echo "vagrant ALL=(ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/vagrant"; chmod 440 "$1/etc/sudoers.d/vagrant"',
        'install -d -m 700 -o 1000 -g 1000 "$1/home/vagrant/.ssh"',
        f'echo "{key}" > "$1/home/vagrant/.ssh/authorized_keys"',
        'chown 1000:1000 "$1/home/vagrant/.ssh/authorized_keys"; chmod 600 "$1/home/vagrant/.ssh/authorized_keys"',
        f"printf '{NETWORK}' > \"$1/etc/systemd/network/eth0.network\"",
        'chroot "$1" systemctl enable systemd-networkd',
        'echo debian12 > "$1/etc/hostname"; printf "127.0.0.1 localhost\\n127.0.1.1 debian12\\n" > "$1/etc/hosts"',
        'echo "/dev/vda / ext4 defaults 0 1" > "$1/etc/fstab"',
    ]
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        f"--architectures={arch.debian}",
        f"--include={','.join(('linux-image-' + arch.debian, *PACKAGES))}",
        *(f"--customize-hook={h}" for h in hooks),
        "bookworm",
        str(root),
        f"deb {mirror} bookworm main",
        f"deb {mirror} bookworm-updates main",
    ]
    work.mkdir(parents=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed:\n{proc.stderr[-3000:]}")
    kernel = sorted((root / "boot").glob("vmlinuz-*"))[-1]
    initrd = sorted((root / "boot").glob("initrd.img-*"))[-1]
    shutil.copyfile(kernel, work / "kernel")
    shutil.copyfile(initrd, work / "initrd")
    raw = work / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(raw), "4G"], check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(work / "box.img")], check=True)
    raw.unlink()
    shutil.rmtree(root)
    (work / "metadata.json").write_text(json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": 4}))
    (work / "Vagrantfile").write_text(
        "Vagrant.configure('2') do |config|\n"
        "  config.vm.provider :libvirt do |lv|\n"
        "    dir = File.dirname(File.expand_path(__FILE__))\n"
        '    lv.kernel = File.join(dir, "kernel")\n'
        '    lv.initrd = File.join(dir, "initrd")\n'
        f'    lv.cmd_line = "root=/dev/vda rw console={arch.console} net.ifnames=0"\n'
        '    lv.graphics_type = "none"\n'
        "  end\n"
        "end\n"
    )
    with tarfile.open(work / "debian12.box", "w") as tar:
        for f in ("metadata.json", "Vagrantfile", "box.img", "kernel", "initrd"):
            tar.add(work / f, arcname=f)
    for f in ("box.img", "kernel", "initrd"):
        (work / f).unlink()
    work.rename(d)
    return box, name
