"""VagrantTarget: the Target protocol over one OpenSSH connection to a Vagrant machine.

One connection per command (and per Guest of the Python API, for its whole life): a
process that asks for the same machine again gets the connection it has open. Every
command and file operation goes to kbridge's agent on that connection (connection.py);
the kernel log and the trace/bpf streams each get a channel of their own. kbridge's guest
helpers (the agents, sudo and sshd's session processes) are known by tgid from the moment
they start, before anything is armed, so a probe counts what the workload (or the whole
guest, with --duration) did. What the machine is (its kernel, its headers, bcc) is read
once at connect (facts.py).

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
import time
from collections.abc import Iterator
from pathlib import Path

from kbridge import crashes, oops, progress
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.images import foreign
from kbridge.images import image as images
from kbridge.paths import state_dir
from kbridge.targets.base import STREAM_PORTS, ExecResult, GuestCrash, GuestIOError, KmsgRecord, KmsgRecords
from kbridge.targets.vagrant import facts as guest_facts
from kbridge.targets.vagrant import machine as machines
from kbridge.targets.vagrant.agent import RUN_DIR, PipeLines
from kbridge.targets.vagrant.connection import Connection

TAINT_DIE = 1 << 7  # /proc/sys/kernel/tainted 'D': the kernel oopsed since boot

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
        self.conn = Connection(machine, self.name, ssh_config, env, self.check_alive)
        self._users = 1
        self._kmsg: tuple[subprocess.Popen[bytes], PipeLines] | None = None
        self._readers: dict[str, tuple[subprocess.Popen[bytes], PipeLines]] = {}
        self._spawned: dict[int, tuple[int, str]] = {}
        self._results: dict[int, ExecResult] = {}
        self._next = 1
        self._busybox: str | None = None
        self._crashed = False
        self._keys: list[tuple[str, str]] = []

    # -- connection ----------------------------------------------------------------

    def _start(self) -> None:
        with progress.step(f"connecting to {self.name} over SSH"):
            self.conn.open()  # the control master; sudo -n once, the machine's lock, kbridge's agent
            self.facts = guest_facts.read_facts(self, guest_facts.BUSYBOX)
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
                guest_facts.push_busybox(self, guest_facts.BUSYBOX, self.conn.conn_id)
            self._busybox = guest_facts.BUSYBOX
        self.flavour = "bcc" if facts.get("bcc") == "yes" and facts.get("headers") == "yes" else "default"
        # The same label on every arch for the same accelerator: what the guest's kernel found.
        self.accel = f"{self.provider}/" + ("kvm" if facts.get("kvm") == "yes" else "tcg")
        self.image = guest_facts.kernel_image(self, self.machine, self.facts)

    def guest_kernel(self) -> foreign.GuestKernel:
        return guest_facts.guest_kernel(self.arch, self.krel, self.facts)

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
            self.conn.end_reader("kmsg", proc)
        self.conn.close()

    def keep_for_process(self) -> None:
        """Keep the connection open until this process exits (a command that asked for the machine's
        arch before it acquired the machine: one connection for the whole command)."""
        self._users += 1
        atexit.register(self.release)

    def __enter__(self) -> VagrantTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

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
            return self.conn.call(lambda a: a.run(argv, stdin, timeout))
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
        pid = self.conn.call(lambda a: a.spawn(tag, argv, stdin))
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
        return self.conn.call(lambda a: a.status(gpid, tag, wait_s))

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
        if errno := self.conn.call(lambda a: a.write(path, data, mode)):
            raise GuestIOError(f"writing {path} in {self.name} failed: {os.strerror(errno)}")

    def read_file(self, path: str) -> bytes:
        """The bytes of PATH in the guest (read by the agent itself)."""
        try:
            return self.conn.call(lambda a: a.read_all(path))
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
        return self.conn.call(lambda a: a.read_all(path, offset, size))

    # -- streams -------------------------------------------------------------------

    def kmsg(self, idle: float = 0.05) -> Iterator[KmsgRecord | None]:
        """Kernel log records as they arrive; the first read replays the log buffer."""
        if self._kmsg is None or self._kmsg[0].poll() is not None:
            self._kmsg = self.conn.reader("kmsg", "copy", "/dev/kmsg")
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
            self._readers[port] = self.conn.reader(port, "hold", link)
        reader = self._readers[port][1]
        reader.idle = idle
        return reader

    def close_stream(self, port: str) -> None:
        """Stop the holder of stream PORT (it removes its link)."""
        if entry := self._readers.pop(port, None):
            self.conn.end_reader(port, entry[0])

    def plumbing_pids(self) -> list[int]:
        """Guest tgids of kbridge's own helpers (the agent, the readers, their sudo and sshd): never probed."""
        return self.conn.plumbing_pids()

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
        return guest_facts.bcc_missing(self.name, self.machine, self.arch, self.facts)

    # -- health --------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise GuestCrash if the guest kernel oopsed (tainted D) or stopped answering after a panic."""
        if self._crashed:
            raise GuestCrash(f"the kernel of {self.name} oopsed", self.console_tail())
        agent = self.conn.agent
        if not self.conn.alive() or agent is None:
            console = self.console_tail(60)
            if oops.is_oops(console):
                self._crashed = True
                raise GuestCrash(f"the kernel of {self.name} panicked", console)
            return
        with contextlib.suppress(GuestIOError, OSError):
            text = agent.read_all("/proc/sys/kernel/tainted").decode().strip()
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
        if self.conn.alive() and self.conn.agent is not None:
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
