"""VagrantTarget: the Target protocol over one OpenSSH connection to a Vagrant machine.

(Over 500 lines: VagrantTarget implements the whole Target protocol over that connection; the
machine lookup and the agent's host end are files of their own.)

One connection per command (and per Guest of the Python API, for its whole life): a
process that asks for the same machine again gets the connection it has open. On it,
kbridge's agent (kbridge/guest/agent.c, installed in the guest's /tmp for the connection)
runs every command and file operation as root, holding the machine's lock so that two
kbridge commands never drive one machine at once; the kernel log and the trace/bpf
streams each get a channel of their own. kbridge's guest helpers (the agents, sudo and
sshd's session processes) are known by tgid from the moment they start, before anything
is armed, so a probe counts what the workload (or the whole guest, with --duration) did.

kbridge never destroys, halts or reboots a machine: release() closes the channels and
the connection; the agents end with them and remove their files.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from kbridge import crashes, oops, progress
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.images import foreign
from kbridge.images import image as images
from kbridge.paths import state_dir
from kbridge.targets.base import STREAM_PORTS, ExecResult, GuestCrash, GuestIOError, KmsgRecord, KmsgRecords
from kbridge.targets.vagrant import machine as machines
from kbridge.targets.vagrant.agent import (
    CONN_PREFIX,
    RUN_DIR,
    Agent,
    Helper,
    PipeLines,
    die_with_parent,
    helper_argv,
    install_argv,
    install_input,
    parse_lineage,
    remote,
)

_T = TypeVar("_T")
MASTER_TIMEOUT_S = 60.0
TAINT_DIE = 1 << 7  # /proc/sys/kernel/tainted 'D': the kernel oopsed since boot
LOCK_WAIT_S = 600.0  # another kbridge command using the machine (the kept VM waits as long)
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

# The connections this process has open, by (Vagrantfile directory, machine): one per machine.
_open: dict[tuple[str, str], VagrantTarget] = {}


class VagrantTarget:
    """A running Vagrant machine, reached over one OpenSSH connection."""

    def __init__(self, machine: str, ssh_config: str, provider: str, env: dict[str, str], where: str) -> None:
        self.machine = machine
        self.name = f"vagrant:{machine}"
        self.provider = provider
        self.env = env
        self.where = where
        self.kept = True  # the user's machine: never shut down by kbridge
        self.flavour = "default"
        # Over the SSH connection, a run armed by guest/tracefs.sh ends with the connection closed
        # (tests/vm/test_vagrant.py, both arches): one file operation per round trip, as --steps does.
        self.scripted_tracefs = False
        self.accel = f"{provider}/tcg"
        self.arch: Arch = get_arch(None)
        self.krel = ""
        self.hostname = ""
        self.image: images.Image
        self.facts: dict[str, str] = {}
        self.ssh_options = machines.ssh_options(ssh_config, machine)
        self.conn_id = secrets.token_hex(6)
        self.control = _control_path(self.conn_id)
        self._users = 1
        self._master: subprocess.Popen[bytes] | None = None
        self._agent: Agent | None = None
        self._lock = threading.RLock()  # one agent request at a time
        self._helpers: dict[str, Helper] = {}
        self._kmsg: tuple[subprocess.Popen[bytes], PipeLines] | None = None
        self._readers: dict[str, tuple[subprocess.Popen[bytes], PipeLines]] = {}
        self._spawned: dict[int, tuple[int, str]] = {}
        self._results: dict[int, ExecResult] = {}
        self._next = 1
        self._busybox: str | None = None
        self._crashed = False
        self._keys: list[tuple[str, str]] = []

    # -- connection ----------------------------------------------------------------

    def _ssh(self, command: str | None, master: bool = False) -> list[str]:
        opts = ["-F", "/dev/null", *self.ssh_options, "-o", f"ControlPath={self.control}", "-o", "BatchMode=yes"]
        if master:
            opts += ["-M", "-N", "-o", "ControlPersist=no", "-o", "ServerAliveInterval=10"]
        else:
            opts += ["-o", "ControlMaster=no", "-T"]
        return ["ssh", *opts, self.machine, *([command] if command else [])]

    def _start(self) -> None:
        with progress.step(f"connecting to {self.name} over SSH"):
            self._master = subprocess.Popen(
                self._ssh(None, master=True),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=self.env,
                preexec_fn=die_with_parent,
            )
            deadline = time.monotonic() + MASTER_TIMEOUT_S
            while not os.path.exists(self.control):
                if self._master.poll() is not None or time.monotonic() > deadline:
                    if self._master.poll() is None:
                        self._master.kill()
                    _, log = self._master.communicate()
                    why = " ".join(log.decode(errors="replace").split())[-300:] or "timed out"
                    raise KbridgeError(
                        f"cannot reach {self.name} over SSH: {why}",
                        f"try `vagrant ssh {self.machine}`; `vagrant reload {self.machine}` if it hangs",
                    )
                time.sleep(0.02)
            with self._lock:
                self._agent_up()  # sudo -n once, the machine's lock, kbridge's agent
            self.facts = self._facts(BUSYBOX)
        facts = self.facts
        self.krel = facts.get("krel", "")
        self.hostname = facts.get("hostname", "")
        try:
            self.arch = get_arch(facts.get("machine", ""))
        except KbridgeError:
            raise KbridgeError(
                f"{self.name} runs on {facts.get('machine')!r}, which kbridge does not support",
                "use an x86_64 or arm64 machine",
            ) from None
        machines.remember_arch(self.env, self.machine, self.arch.name)
        if int(facts.get("tainted", "0") or 0) & TAINT_DIE:
            raise KbridgeError(
                f"the kernel of {self.name} has oopsed since it booted (tainted D)", f"vagrant reload {self.machine}"
            )
        if facts.get("busybox") != "yes":
            if facts.get("pushed_busybox") != "yes":
                self._push_busybox(BUSYBOX)
            self._busybox = BUSYBOX
        self.flavour = "bcc" if facts.get("bcc") == "yes" and facts.get("headers") == "yes" else "default"
        # The same label on every arch for the same accelerator: what the guest's kernel found.
        self.accel = f"{self.provider}/" + ("kvm" if facts.get("kvm") == "yes" else "tcg")
        self.image = self._image()

    def _facts(self, busybox: str) -> dict[str, str]:
        res = self.run(["/bin/sh", "-c", FACTS, "kbridge-facts", busybox], timeout=120)
        found: dict[str, str] = {}
        for line in res.text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                found.setdefault(key, value)
        if "krel" not in found:
            raise KbridgeError(f"cannot read the kernel of {self.name}: {res.stderr.decode(errors='replace')[-300:]}")
        return found

    def _push_busybox(self, path: str) -> None:
        data = foreign.static_busybox(self.arch).read_bytes()
        tmp = f"{path}.{self.conn_id}"
        self.run(["mkdir", "-p", "-m", "700", os.path.dirname(path)], timeout=60)
        self.write_file(tmp, data)
        res = self.run(["/bin/sh", "-c", 'chmod 755 "$1" && mv -f "$1" "$2"', "kbridge", tmp, path], timeout=60)
        if not res.ok:
            raise KbridgeError(f"could not install busybox in {self.name}: {res.stderr.decode(errors='replace')}")

    def _image(self) -> images.Image:
        """The kernel's headers and facts: kbridge's own image for its boxes, else the machine's own kernel."""
        own = images.load(self.arch, images.DEFAULT_SUITE, verify=False)
        version = self.facts.get("kpkg", "").split()[1:2]
        if own is not None and own.krel == self.krel and (self.facts.get("kbridge_box") or version == [own.version]):
            return own
        if self.facts.get("kbridge_box"):
            own = images.ensure(self.arch)
            if own.krel != self.krel:
                raise KbridgeError(
                    f"{self.name} was made from an older kbridge box (kernel {self.krel}; the image has {own.krel})",
                    f"kbridge box build --arch {self.arch.name}, then vagrant destroy {self.machine} "
                    f"and vagrant up {self.machine}",
                )
            return own
        kernel = self.guest_kernel()
        config = None
        if (path := self.facts.get("config")) and not (foreign.kernel_dir(kernel) / "config").is_file():
            with contextlib.suppress(KbridgeError):
                config = self.read_file(path)
        return foreign.image_for(kernel, self._fetch_headers, config)

    def guest_kernel(self) -> foreign.GuestKernel:
        f = self.facts
        return foreign.GuestKernel(
            self.arch, self.krel, f.get("version", ""), f.get("os", ""), f.get("codename", ""), f.get("kpkg", "")
        )

    def _fetch_headers(self, img: images.Image) -> None:
        """The headers of the machine's own kernel: its own /lib/modules/KREL/build, else Debian's package."""
        kernel = self.guest_kernel()
        if self.facts.get("headers") == "yes":
            with progress.step(f"copying the kernel headers of {self.name} ({self.krel}) to the host, once"):
                trees = self.run(["/bin/sh", "-c", foreign.GUEST_TREES, "kbridge", self.krel], timeout=60)
                if trees.ok and trees.text.split():
                    tar = self.run(["tar", "-C", "/", "-cf", "-", *trees.text.split()], timeout=900)
                    if not tar.ok:
                        raise KbridgeError(
                            f"could not copy the kernel headers out of {self.name}: "
                            f"{tar.stderr.decode(errors='replace').strip()[-300:]}"
                        )
            if trees.ok and trees.text.split():
                foreign.from_guest_tar(img, tar.stdout)
                return
        if foreign.from_archive(img, kernel):
            return
        where = f"; Debian {kernel.codename} has no linux-headers-{self.krel}" if kernel.debian else ""
        raise KbridgeError(
            f"no kernel headers for {self.krel} (the kernel of {self.name}): the machine has no "
            f"/lib/modules/{self.krel}/build{where}",
            foreign.install_hint(kernel, self.machine),
        )

    def release(self) -> None:
        """Done with it: the last user closes the channels and the connection; the machine keeps running."""
        self._users -= 1
        if self._users > 0:
            return
        for key in self._keys:
            if _open.get(key) is self:
                del _open[key]
        for port in list(self._readers):
            with contextlib.suppress(Exception):
                self.close_stream(port)
        if self._kmsg is not None:
            proc = self._kmsg[0]
            self._kmsg = None
            self._helpers.pop("kmsg", None)
            _close_reader(proc)
        with contextlib.suppress(Exception):
            self._agent_down()
        if self._master is not None and self._master.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run(
                    ["ssh", "-o", f"ControlPath={self.control}", "-O", "exit", self.machine],
                    capture_output=True,
                    timeout=10,
                    env=self.env,
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._master.wait(timeout=5)
            if self._master.poll() is None:
                self._master.kill()
                self._master.wait()
        if self._master is not None and self._master.stderr:
            self._master.stderr.close()
        self._master = None
        with contextlib.suppress(OSError):
            os.unlink(self.control)

    def keep_for_process(self) -> None:
        """Keep the connection open until this process exits (a command that asked for the machine's
        arch before it acquired the machine: one connection for the whole command)."""
        self._users += 1
        atexit.register(self.release)

    def __enter__(self) -> VagrantTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the agent -----------------------------------------------------------------

    def _check_master(self) -> None:
        if self._master is None or self._master.poll() is not None:
            self.check_alive()
            raise GuestIOError(f"the SSH connection to {self.name} is closed")

    def _agent_up(self) -> Agent:
        if self._agent is not None and self._agent.proc.poll() is None:
            return self._agent
        self._check_master()
        proc = subprocess.Popen(
            self._ssh(remote(install_argv(self.conn_id))),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            preexec_fn=die_with_parent,
        )
        agent = Agent(proc, self.name)
        told: list[bool] = []

        def busy() -> None:
            if not told:
                progress.info(f"waiting for another kbridge command using {self.name}")
                told.append(True)

        try:
            helper = agent.ready(LOCK_WAIT_S, busy, install_input())
        except (TimeoutError, GuestIOError, OSError) as e:
            proc.kill()
            _, errout = proc.communicate()
            why = " ".join(errout.decode(errors="replace").split())[-300:]
            if "sudo" in why and ("password" in why or "not allowed" in why or "sudoers" in why):
                raise KbridgeError(
                    f"sudo -n is refused in {self.name}: {why}",
                    "kbridge runs guest commands as root with sudo -n: give the SSH user "
                    "passwordless sudo (Vagrant boxes do)",
                ) from None
            if isinstance(e, TimeoutError) and told:
                raise KbridgeError(
                    f"{self.name} stayed busy with another kbridge command for {LOCK_WAIT_S:.0f} s"
                ) from None
            raise KbridgeError(f"could not start kbridge's agent in {self.name}: {why or e}") from None
        self._agent = agent
        self._helpers["agent"] = helper
        return agent

    def _agent_down(self) -> None:
        """Close the agent's channel: it stops what it runs, removes its files and the machine's lock."""
        agent, self._agent = self._agent, None
        self._helpers.pop("agent", None)
        if agent is not None:
            _close_reader(agent.proc)

    def _call(self, fn: Callable[[Agent], _T]) -> _T:
        with self._lock:
            agent = self._agent_up()
            try:
                return fn(agent)
            except GuestIOError:
                self._agent_down()
                self._check_master()
                raise
            except BaseException:
                # Interrupted mid-request (Ctrl-C, a timeout): its framing is lost. The next call
                # starts a fresh agent (the old one stops what it ran when its channel closes).
                self._agent_down()
                raise

    def _argv(self, argv: list[str]) -> list[str]:
        if not argv:
            raise KbridgeError("empty guest command")
        if self._busybox is None:
            return argv
        return [self._busybox if a == "/bin/busybox" else a for a in argv]

    # -- commands ------------------------------------------------------------------

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float | None = 120) -> ExecResult:
        """Run ARGV as root in the guest and wait for it; past TIMEOUT s it is killed."""
        argv = self._argv(argv)
        try:
            return self._call(lambda a: a.run(argv, stdin, timeout))
        except TimeoutError:
            raise GuestIOError(
                f"guest command {shlex.join(argv)[:80]!r} still running after {timeout} s: stopped"
            ) from None

    def spawn(self, argv: list[str], stdin: bytes | None = None) -> int:
        """Start ARGV as root in the guest; a handle for poll()/wait()/guest_pid()."""
        argv = self._argv(argv)
        handle = self._next
        self._next += 1
        tag = f"s{handle}-{secrets.token_hex(3)}"
        pid = self._call(lambda a: a.spawn(tag, argv, stdin))
        self._spawned[handle] = (pid, tag)
        return handle

    def _spawned_of(self, handle: int) -> tuple[int, str]:
        try:
            return self._spawned[handle]
        except KeyError:
            raise KbridgeError(f"no guest command with handle {handle} in {self.name}") from None

    def guest_pid(self, handle: int) -> int:
        return self._spawned_of(handle)[0]

    def poll(self, pid: int) -> ExecResult | None:
        """The result of spawned command PID (a handle), or None while it runs."""
        if pid in self._results:
            return self._results[pid]
        gpid, tag = self._spawned_of(pid)
        res = self._status(gpid, tag, 0.0)
        if res is not None:
            self._results[pid] = res
        return res

    def _status(self, gpid: int, tag: str, wait_s: float) -> ExecResult | None:
        return self._call(lambda a: a.status(gpid, tag, wait_s))

    def wait(self, pid: int, timeout: float | None = None) -> ExecResult:
        """Wait for spawned command PID (a handle); GuestIOError after TIMEOUT s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._results:
            gpid, tag = self._spawned_of(pid)
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                raise GuestIOError(f"guest command (handle {pid}) still running after {timeout} s")
            if (res := self._status(gpid, tag, left)) is not None:
                self._results[pid] = res
        return self._results[pid]

    def write_file(self, path: str, data: bytes, mode: str = "w") -> None:
        """Write DATA to PATH; mode "a" appends. One write(2) up to 1 MiB (a tracefs file parses each write)."""
        if mode not in ("w", "a"):
            raise KbridgeError(f"unknown write mode {mode!r}")
        if errno := self._call(lambda a: a.write(path, data, mode)):
            raise GuestIOError(f"writing {path} in {self.name} failed: {os.strerror(errno)}")

    def read_file(self, path: str) -> bytes:
        """The bytes of PATH in the guest (read by the agent itself)."""
        try:
            return self._call(lambda a: a.read_all(path))
        except OSError as e:
            raise GuestIOError(f"reading {path} in {self.name} failed: {e.strerror}") from None

    def read_chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        """PATH's bytes, SIZE at a time (one agent request each)."""
        offset = 0
        while True:
            try:
                chunk = self._read_at(path, offset, size)
            except OSError as e:
                raise GuestIOError(f"reading {path} in {self.name} failed: {e.strerror}") from None
            if not chunk:
                return
            yield chunk
            if len(chunk) < size:
                return
            offset += len(chunk)

    def _read_at(self, path: str, offset: int, size: int) -> bytes:
        return self._call(lambda a: a.read_all(path, offset, size))

    # -- streams -------------------------------------------------------------------

    def _reader(self, what: str, mode: str, arg: str) -> tuple[subprocess.Popen[bytes], PipeLines]:
        """`agent copy|hold` on a channel of its own, once it has said its pids (so a probe armed after
        this call already excludes it). Its stdin stays open: it ends when kbridge closes it or dies."""
        self._check_master()
        with self._lock:
            self._agent_up()  # installs the agent binary the helper runs
        proc = subprocess.Popen(
            self._ssh(remote(helper_argv(self.conn_id, mode, arg))),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            preexec_fn=die_with_parent,
        )
        assert proc.stdout is not None
        lines = PipeLines(proc.stdout, what, self.name, self.check_alive)
        lines.idle = 0.2
        deadline = time.monotonic() + 60
        first = None
        try:
            while first is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise GuestIOError(f"the {what} reader did not start in {self.name}")
                first = next(lines)
            self._helpers[what] = Helper(*parse_lineage(first))
        except BaseException:
            _close_reader(proc)
            raise
        return proc, lines

    def kmsg(self, idle: float = 0.05) -> Iterator[KmsgRecord | None]:
        """Kernel log records as they arrive; the first read replays the log buffer."""
        if self._kmsg is None or self._kmsg[0].poll() is not None:
            self._kmsg = self._reader("kmsg", "copy", "/dev/kmsg")
        self._kmsg[1].idle = idle
        return KmsgRecords(self._kmsg[1])

    def stream_path(self, port: str) -> str:
        """The guest path a program writes to so its lines arrive on stream PORT.

        stream() makes it a link to the stdout of `agent hold`, which is the SSH channel
        itself: the writer's bytes go straight to sshd, and no relay process (which a probe
        on the write path would see) sits in between.
        """
        if port not in STREAM_PORTS:
            raise KbridgeError(f"unknown stream port {port!r}")
        return f"{RUN_DIR}/{port}"

    def stream(self, port: str, idle: float = 0.05) -> PipeLines:
        """The host end of stream PORT, open before the guest writes; writers come and go."""
        link = self.stream_path(port)
        if port not in self._readers or self._readers[port][0].poll() is not None:
            self._readers[port] = self._reader(port, "hold", link)
        reader = self._readers[port][1]
        reader.idle = idle
        return reader

    def close_stream(self, port: str) -> None:
        """Stop the holder of stream PORT (it removes its link)."""
        if entry := self._readers.pop(port, None):
            self._helpers.pop(port, None)
            _close_reader(entry[0])

    def plumbing_pids(self) -> list[int]:
        """Guest tgids of kbridge's own helpers (the agent, the readers, their sudo and sshd): never probed."""
        return sorted({p for h in self._helpers.values() for p in h.pids})

    def describe(self) -> dict:
        """What a status listing shows of it."""
        return {
            "target": self.name,
            "arch": self.arch.name,
            "kernel": self.krel,
            "accel": self.accel,
            "flavour": self.flavour,
            "machine": self.machine,
            "hostname": self.hostname,
            "provider": self.provider,
        }

    def bcc_python(self) -> list[str] | None:
        """python3 with bcc (python3-bpfcc) and the headers it compiles against, or None."""
        return ["/usr/bin/python3"] if self.flavour == "bcc" else None

    def bcc_missing(self) -> KbridgeError:
        """What --via bpf says on this machine without bcc: the Vagrant steps that give it one."""
        if self.facts.get("kbridge_box"):
            return KbridgeError(
                f"{self.name} has no bcc: it was made from the default kbridge box, which has no python3-bpfcc",
                f"kbridge box build --bcc --arch {self.arch.name}, then vagrant destroy {self.machine} and "
                f"KBRIDGE_VAGRANT_BCC=1 vagrant up {self.machine} (a machine keeps the disk of its first box)",
            )
        missing = [
            what
            for what, ok in (
                ("python3-bpfcc", self.facts.get("bcc") == "yes"),
                ("kernel headers (bcc compiles against them)", self.facts.get("headers") == "yes"),
            )
            if not ok
        ]
        return KbridgeError(
            f"{self.name} has no {' and no '.join(missing)}: --via bpf runs bcc in the machine",
            f"vagrant ssh {self.machine} -c 'sudo apt-get install python3-bpfcc linux-headers-$(uname -r)'",
        )

    # -- health --------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise GuestCrash if the guest kernel oopsed (tainted D) or stopped answering after a panic."""
        if self._crashed:
            raise GuestCrash(f"the kernel of {self.name} oopsed", self.console_tail())
        if self._master is None or self._master.poll() is not None or self._agent is None:
            console = self.console_tail(60)
            if oops.is_oops(console):
                self._crashed = True
                raise GuestCrash(f"the kernel of {self.name} panicked", console)
            return
        with contextlib.suppress(GuestIOError, OSError):
            text = self._agent.read_all("/proc/sys/kernel/tainted").decode().strip()
            if text.isdigit() and int(text) & TAINT_DIE:
                self._crashed = True
                raise GuestCrash(f"the kernel of {self.name} oopsed", self.console_tail())

    def crashed(self) -> bool:
        return self._crashed

    def mark_crashed(self, report: Path | None = None) -> None:
        """The guest oopsed: kbridge cannot restart a Vagrant machine, so it says how."""
        self._crashed = True
        progress.warn(f"the kernel of {self.name} oopsed: `vagrant reload {self.machine}` restarts it")

    def _dmesg(self) -> list[str]:
        res = self.run(["/bin/busybox", "dmesg"], timeout=30)
        return res.text.splitlines() if res.ok else []

    def log_mark(self) -> int:
        """The kernel log's length now."""
        with contextlib.suppress(KbridgeError):
            return len(self._dmesg())
        return 0

    def crash_since(self, mark: int) -> str | None:
        with contextlib.suppress(KbridgeError):
            return crashes.find("\n".join(self._dmesg()[mark:]))
        return crashes.find(self.console_tail(200))

    def host_state(self) -> Path:
        d = state_dir() / f"vagrant-{self.machine}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def console_tail(self, lines: int = 40) -> str:
        """The end of the kernel log (over SSH), else of the libvirt serial console log."""
        if self._master is not None and self._master.poll() is None and self._agent is not None:
            with contextlib.suppress(Exception):
                res = self.run(["/bin/busybox", "dmesg"], timeout=20)
                if res.ok:
                    return "\n".join(res.text.splitlines()[-lines:])
        path = self._console_log()
        if path is not None:
            with contextlib.suppress(OSError):
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _console_log(self) -> Path | None:
        """The file libvirt writes the machine's serial console to, if the domain has one."""
        if shutil.which("virsh") is None:
            return None
        try:
            uuid = (machines.dotdir(self.env) / "machines" / self.machine / "libvirt" / "id").read_text().strip()
            xml = subprocess.run(
                ["virsh", "-c", "qemu:///system", "dumpxml", uuid], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        m = re.search(r"<serial type='file'>\s*<source path='([^']+)'", xml)
        return Path(m.group(1)) if m else None


def _close_reader(proc: subprocess.Popen[bytes]) -> None:
    """End a helper's channel by closing its stdin (it exits and cleans up), then reap the ssh."""
    if proc.stdin:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for f in (proc.stdout, proc.stderr):
        if f:
            f.close()


def _control_path(conn_id: str) -> str:
    """The control master's socket: in kbridge's state directory (short enough for a socket path)."""
    d = state_dir() / "vagrant"
    d.mkdir(parents=True, exist_ok=True)
    path = str(d / f"ssh-{conn_id}")
    if len(path) > 90:  # sun_path is 108 bytes, and ssh adds a suffix while it creates the socket
        path = f"/tmp/kbridge-ssh-{os.getuid()}-{conn_id}"
    return path


def connect(machine: str | None, vagrantfile_dir: Path | None = None) -> VagrantTarget:
    """The running Vagrant machine MACHINE (None: the one machine of the Vagrantfile that runs).

    A machine this process is connected to already gives that connection.
    """
    env, where = machines.environment(vagrantfile_dir)
    base = str(machines.dotdir(env).resolve())
    asked = (base, machine or "")
    if (live := _open.get(asked)) is not None:
        live._users += 1
        return live
    if machine is None:
        machine = machines.running_machine(env, where)
        if (live := _open.get((base, machine))) is not None:
            live._users += 1
            live._keys.append(asked)
            _open[asked] = live
            return live
    cfg = machines.vagrant_cmd(["ssh-config", machine], env)
    if cfg.returncode != 0 or not re.search(r"^Host ", cfg.stdout, re.M):
        machines.explain_not_ready(machine, env, where, machines.vagrant_message(cfg))
    target = VagrantTarget(machine, cfg.stdout, machines.provider_of(env, machine), env, where)
    try:
        target._start()
    except BaseException:
        target.release()
        raise
    target._keys = sorted({asked, (base, machine)})
    for key in target._keys:
        _open[key] = target
    return target


def known_arch(machine: str | None, vagrantfile_dir: Path | None = None) -> str | None:
    """MACHINE's arch as an earlier connection found it (None: never seen, or created again since)."""
    if machine is None:
        return None
    env, _ = machines.environment(vagrantfile_dir)
    return machines.known_arch(env, machine)
