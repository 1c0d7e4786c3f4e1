"""Network namespaces through netlink (pyroute2): a private network for libvirt and Vagrant.

libvirt's management network (a bridge on a private range, dnsmasq, iptables rules)
lives entirely inside a namespace made here, so nothing appears in the host's own
network. Daemons started in it also get a private mount namespace with a fresh
sysfs, as `ip netns exec` does: libvirt's bridge code reads /sys/class/net, which
must show the namespace's interfaces, not the host's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator

from pyroute2 import IPRoute, NetNS, netns

from kbridge.errors import KbridgeError

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
MNT_DETACH = 2


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise KbridgeError(f"{what} needs root (network namespaces)", "run it as root, e.g. with sudo")


def exists(name: str) -> bool:
    return name in netns.listnetns()


def create(name: str) -> None:
    """Create network namespace NAME with its loopback up (it starts down)."""
    _need_root(f"creating network namespace {name!r}")
    if exists(name):
        raise KbridgeError(
            f"network namespace {name!r} already exists", f"remove it first if it is stale: ip netns delete {name}"
        )
    netns.create(name)
    with NetNS(name) as ns:
        lo = ns.link_lookup(ifname="lo")
        ns.link("set", index=lo[0], state="up")


def remove(name: str) -> None:
    """Remove namespace NAME; its interfaces (bridges, taps) go with it."""
    if exists(name):
        netns.remove(name)


def links(name: str | None = None) -> list[str]:
    """Like `ip -br addr`: 'IFNAME STATE ADDR/PREFIX ...' per link, of NAME or the current namespace."""
    ipr = NetNS(name) if name else IPRoute()
    with ipr:
        addrs: dict[int, list[str]] = {}
        for a in ipr.get_addr():
            addrs.setdefault(a["index"], []).append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        out = []
        for link in ipr.get_links():
            state = link.get_attr("IFLA_OPERSTATE") or "UNKNOWN"
            out.append(" ".join([link.get_attr("IFLA_IFNAME"), state, *sorted(addrs.get(link["index"], []))]))
    return sorted(out)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the calling thread (and the processes and threads it starts) in namespace NAME.

    Only the network namespace changes: subprocesses such as ssh reach addresses
    inside NAME, and the thread returns to its namespace on exit.
    """
    _need_root(f"entering network namespace {name!r}")
    if not exists(name):
        raise KbridgeError(f"network namespace {name!r} does not exist")
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns.setns(name, flags=0)
        try:
            yield
        finally:
            netns.setns(home, flags=0)
    finally:
        os.close(home)


def preexec(name: str, binds: tuple[tuple[str, str], ...] = ()) -> Callable[[], None]:
    """A subprocess preexec_fn: enter namespace NAME as `ip netns exec` does.

    It joins the network namespace, unshares the mount namespace (changes stay
    private to the child), mounts a sysfs that shows NAME's interfaces, and bind
    mounts each (SOURCE, TARGET) of BINDS, e.g. a daemon's configuration file.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"{what} failed in namespace {name}")

    def enter() -> None:
        netns.setns(name, flags=0)
        check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "making / a slave mount")
        libc.umount2(b"/sys", MNT_DETACH)
        check(libc.mount(name.encode(), b"/sys", b"sysfs", 0, None), "mounting sysfs")
        for src, dst in binds:
            check(libc.mount(src.encode(), dst.encode(), None, MS_BIND, None), f"bind mount {src} on {dst}")

    return enter
