"""libvirtd and virtlogd inside a network namespace this test creates (and removes).

The network rule of this project's machines: tests send traffic only to loopback
or to addresses inside a namespace they made. vagrant-libvirt's management network
(a virbr bridge on 192.168.121.0/24, dnsmasq, iptables rules) and the guests are all
created by libvirtd, so libvirtd runs in the namespace, and so do vagrant and ssh
(the test thread enters it). These machines have no systemd: the daemons are started
here, as children of the test, and stopped by pid.

QEMU runs as root in that daemon (qemu.conf bind-mounted in the daemon's private
mount namespace): as libvirt-qemu, /dev/kvm being root-only makes libvirt probe
QEMU's capabilities again on every call (~4 s each).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from kbridge import netns

APT_PACKAGES = (
    "vagrant",
    "vagrant-libvirt",
    "libvirt-daemon-system",
    "libvirt-clients",
    "dnsmasq-base",
    "iptables",
    "qemu-utils",
    "openssh-client",
    "netcat-openbsd",  # nc: the tests' SSH proxy into the namespace (config.ssh.proxy_command)
)
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
URI = "qemu:///system"


def missing_tools() -> list[str]:
    return [
        t
        for t in ("vagrant", "libvirtd", "virtlogd", "virsh", "qemu-img", "dnsmasq", "iptables", "ssh", "nc")
        if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()
    ]


def apt_install() -> subprocess.CompletedProcess[str]:
    """Install APT_PACKAGES without starting their daemons (a deny-all policy-rc.d while it runs):
    libvirtd started by its package would put libvirt's default network in the host's namespace."""
    policy = Path("/usr/sbin/policy-rc.d")
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\n# no daemon starts during the test's package installation\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        proc = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            proc = subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES],
                capture_output=True,
                text=True,
                env=env,
            )
        return proc
    finally:
        if made:
            policy.unlink()


def _answers(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)


class LibvirtInNetns:
    """Start: namespace, virtlogd, libvirtd. Stop: undo all of it, in reverse."""

    def __init__(self, workdir: Path, name: str | None = None) -> None:
        self.workdir = workdir
        self.name = name or f"kbridge-vg-{os.getpid()}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.networks_before: set[str] = set()

    def start(self) -> None:
        if _answers(LIBVIRT_SOCK):
            raise RuntimeError(
                f"a libvirtd already answers on {LIBVIRT_SOCK}: the test starts its own inside "
                "a network namespace; stop the other one first"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        qemu_conf = self.workdir / "qemu.conf"
        qemu_conf.write_text('user = "root"\ngroup = "root"\n')
        netns.create(self.name)
        try:
            enter = netns.preexec(self.name, ((str(qemu_conf), "/etc/libvirt/qemu.conf"),))
            self._daemon(["virtlogd"], "virtlogd.log", enter, VIRTLOGD_SOCK)
            self._daemon(["libvirtd"], "libvirtd.log", enter, LIBVIRT_SOCK)
            deadline = time.monotonic() + 60
            while virsh("version").returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"libvirtd did not answer: {self.log('libvirtd.log')}")
                time.sleep(0.2)
            self.networks_before = set(virsh("net-list", "--all", "--name").stdout.split())
        except BaseException:
            self.stop()
            raise

    def _daemon(self, argv: list[str], log: str, enter, sock: Path) -> None:  # type: ignore[no-untyped-def]
        with open(self.workdir / log, "wb") as f:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, preexec_fn=enter
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while not _answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start: {self.log(log)}")
            time.sleep(0.05)

    def log(self, name: str) -> str:
        try:
            return (self.workdir / name).read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Networks this run created (their dnsmasq), the daemons, the namespace."""
        if self.procs and self.procs[-1].poll() is None:
            with contextlib.suppress(Exception):
                for net in set(virsh("net-list", "--all", "--name").stdout.split()) - self.networks_before:
                    virsh("net-destroy", net)
                    virsh("net-undefine", net)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if netns.exists(self.name):
            # Whatever the daemons started that still runs there (a dnsmasq left by a failed run).
            for pid in _pids_in(self.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            netns.remove(self.name)


def _pids_in(name: str) -> list[int]:
    """Processes whose network namespace is NAME (by inode)."""
    try:
        target = os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return []
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(d / "ns/net").st_ino == target:
                    found.append(int(d.name))
    return [p for p in found if p != os.getpid()]


def prune_box_volumes(keep: set[str]) -> None:
    """Remove box volumes of older kbridge box versions from libvirt's default pool."""
    vols = virsh("vol-list", "default").stdout
    for name in re.findall(r"^\s*(kbridge-VAGRANTSLASH-\S+)", vols, re.M):
        if not any(k in name for k in keep):
            virsh("vol-delete", "--pool", "default", name)


def remove_stale_domain(name: str) -> None:
    """A domain NAME left defined by an interrupted earlier run (its .vagrant state is gone)."""
    if name in virsh("list", "--all", "--name").stdout.split():
        virsh("destroy", name)
        virsh("undefine", name, "--remove-all-storage")
