"""What kbridge reads of a Vagrant machine when it connects, and what follows from it.

One command run as root gives the facts (kernel, arch, taint, busybox, bcc, headers, the
distribution's kernel package); from them come a busybox pushed where the machine has none,
the image whose headers build modules for the machine's kernel (kbridge's own for its boxes,
else the machine's own headers or Debian's package), and what --via bpf says without bcc.
"""

from __future__ import annotations

import contextlib
import os

from kbridge import progress
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images import foreign
from kbridge.images import image as images
from kbridge.targets.base import Target
from kbridge.targets.vagrant.agent import CONN_PREFIX

# A machine without /bin/busybox gets Debian's static one here (kept across connections until reboot;
# named busybox: it takes the applet from its argv[0] unless that is "busybox").
BUSYBOX = "/tmp/kbridge-tools/busybox"

# What kbridge needs to know of the guest, in one command run as root (before anything is armed);
# it also removes the directories of connections whose agent is gone (a kbridge killed with -9).
FACTS = r"""
echo "krel=$(uname -r)"; echo "machine=$(uname -m)"; echo "tainted=$(cat /proc/sys/kernel/tainted)"
echo "hostname=$(cat /proc/sys/kernel/hostname)"; echo "version=$(cat /proc/version)"
[ -x /bin/busybox ] && echo busybox=yes
[ -n "$1" ] && [ -x "$1" ] && echo pushed_busybox=yes
[ -e /usr/lib/python3/dist-packages/bcc/__init__.py ] && echo bcc=yes
[ -e /etc/kbridge/box.json ] && echo kbridge_box=yes
[ -f "/lib/modules/$(uname -r)/build/Makefile" ] && echo headers=yes
[ -r "/boot/config-$(uname -r)" ] && echo "config=/boot/config-$(uname -r)"
if [ -r /etc/os-release ]; then . /etc/os-release; echo "os=$ID"; echo "codename=${VERSION_CODENAME:-}"; fi
command -v dpkg-query >/dev/null 2>&1 && dpkg-query -W -f='kpkg=${Package} ${Version}\n' \
    "linux-image-$(uname -r)" "linux-image-$(uname -r)-unsigned" 2>/dev/null
dmesg 2>/dev/null | grep -q -e 'Hypervisor detected: KVM' -e 'KVM: hypervisor services' && echo kvm=yes
for d in PREFIX*; do
    [ -d "$d" ] || continue; p=$(cat "$d/pid" 2>/dev/null)
    [ -n "$p" ] && [ -d "/proc/$p" ] || rm -rf "$d"
done
true
""".replace("PREFIX", CONN_PREFIX)


def read_facts(guest: Target, busybox: str) -> dict[str, str]:
    """FACTS run in GUEST (BUSYBOX: where a pushed busybox would be), as key=value (the first of each)."""
    res = guest.run(["/bin/sh", "-c", FACTS, "kbridge-facts", busybox], timeout=120)
    found: dict[str, str] = {}
    for line in res.text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found.setdefault(key, value)
    if "krel" not in found:
        raise KbridgeError(f"cannot read the kernel of {guest.name}: {res.stderr.decode(errors='replace')[-300:]}")
    return found


def push_busybox(guest: Target, path: str, suffix: str) -> None:
    """Debian's static busybox for the guest's arch at PATH (written beside it as PATH.SUFFIX, then renamed)."""
    data = foreign.static_busybox(guest.arch).read_bytes()
    tmp = f"{path}.{suffix}"
    guest.run(["mkdir", "-p", "-m", "700", os.path.dirname(path)], timeout=60)
    guest.write_file(tmp, data)
    res = guest.run(["/bin/sh", "-c", 'chmod 755 "$1" && mv -f "$1" "$2"', "kbridge", tmp, path], timeout=60)
    if not res.ok:
        raise KbridgeError(f"could not install busybox in {guest.name}: {res.stderr.decode(errors='replace')}")


def guest_kernel(arch: Arch, krel: str, facts: dict[str, str]) -> foreign.GuestKernel:
    """The machine's kernel as the image cache names it."""
    f = facts
    return foreign.GuestKernel(
        arch, krel, f.get("version", ""), f.get("os", ""), f.get("codename", ""), f.get("kpkg", "")
    )


def kernel_image(guest: Target, machine: str, facts: dict[str, str]) -> images.Image:
    """The kernel's headers and facts: kbridge's own image for its boxes, else the machine's own kernel."""
    arch, krel = guest.arch, guest.krel
    own = images.load(arch, images.DEFAULT_SUITE, verify=False)
    version = facts.get("kpkg", "").split()[1:2]
    if own is not None and own.krel == krel and (facts.get("kbridge_box") or version == [own.version]):
        return own
    if facts.get("kbridge_box"):
        own = images.ensure(arch)
        if own.krel != krel:
            raise KbridgeError(
                f"{guest.name} was made from an older kbridge box (kernel {krel}; the image has {own.krel})",
                f"kbridge box build --arch {arch.name}, then vagrant destroy {machine} and vagrant up {machine}",
            )
        return own
    kernel = guest_kernel(arch, krel, facts)
    config = None
    if (path := facts.get("config")) and not (foreign.kernel_dir(kernel) / "config").is_file():
        with contextlib.suppress(KbridgeError):
            config = guest.read_file(path)
    return foreign.image_for(kernel, lambda img: _fetch_headers(guest, machine, kernel, facts, img), config)


def _fetch_headers(
    guest: Target, machine: str, kernel: foreign.GuestKernel, facts: dict[str, str], img: images.Image
) -> None:
    """The headers of the machine's own kernel: its own /lib/modules/KREL/build, else Debian's package."""
    krel = guest.krel
    if facts.get("headers") == "yes":
        with progress.step(f"copying the kernel headers of {guest.name} ({krel}) to the host, once"):
            trees = guest.run(["/bin/sh", "-c", foreign.GUEST_TREES, "kbridge", krel], timeout=60)
            if trees.ok and trees.text.split():
                tar = guest.run(["tar", "-C", "/", "-cf", "-", *trees.text.split()], timeout=900)
                if not tar.ok:
                    raise KbridgeError(
                        f"could not copy the kernel headers out of {guest.name}: "
                        f"{tar.stderr.decode(errors='replace').strip()[-300:]}"
                    )
        if trees.ok and trees.text.split():
            foreign.from_guest_tar(img, tar.stdout)
            return
    if foreign.from_archive(img, kernel):
        return
    where = f"; Debian {kernel.codename} has no linux-headers-{krel}" if kernel.debian else ""
    raise KbridgeError(
        f"no kernel headers for {krel} (the kernel of {guest.name}): the machine has no "
        f"/lib/modules/{krel}/build{where}",
        foreign.install_hint(kernel, machine),
    )


def bcc_missing(name: str, machine: str, arch: Arch, facts: dict[str, str]) -> KbridgeError:
    """What --via bpf says on a machine without bcc: the Vagrant steps that give it one."""
    if facts.get("kbridge_box"):
        return KbridgeError(
            f"{name} has no bcc: it was made from the default kbridge box, which has no python3-bpfcc",
            f"kbridge box build --bcc --arch {arch.name}, then vagrant destroy {machine} and "
            f"KBRIDGE_VAGRANT_BCC=1 vagrant up {machine} (a machine keeps the disk of its first box)",
        )
    missing = [
        what
        for what, ok in (
            ("python3-bpfcc", facts.get("bcc") == "yes"),
            ("kernel headers (bcc compiles against them)", facts.get("headers") == "yes"),
        )
        if not ok
    ]
    return KbridgeError(
        f"{name} has no {' and no '.join(missing)}: --via bpf runs bcc in the machine",
        f"vagrant ssh {machine} -c 'sudo apt-get install python3-bpfcc linux-headers-$(uname -r)'",
    )
