"""VagrantTarget: the Target protocol over one OpenSSH control master to a Vagrant machine."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kbridge import crashes, oops, progress
from kbridge.arch import Arch, get_arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.paths import state_dir
from kbridge.targets.base import STREAM_PORTS, ExecResult, GuestCrash, GuestIOError, KmsgRecord, KmsgRecords
from kbridge.targets.vagrant.machine import (
    INSTALL_HINT,
    dotdir,
    explain_not_ready,
    host_block,
    provider_of,
    vagrant_cmd,
    vagrant_message,
)
from kbridge.targets.vagrant.shell import (
    AGENT_SCRIPT,
    MASTER_TIMEOUT_S,
    PROBE,
    RUN_DIR,
    TAINT_DIE,
    PipeLines,
    RootShell,
    Spawned,
    die_with_parent,
)


class VagrantTarget:
    """A running Vagrant machine, reached over one OpenSSH control master."""

    def __init__(self, machine: str, ssh_config: str, provider: str, env: dict[str, str]) -> None:
        self.machine = machine
        self.name = f"vagrant:{machine}"
        self.provider = provider
        self.env = env
        self.kept = True  # the user's machine: never shut down by kbridge
        self.flavour = "default"
        self.accel = provider
        self.arch: Arch = get_arch(None)
        self.krel = ""
        self.image: images.Image
        key = hashlib.sha256(f"{env.get('VAGRANT_CWD', os.getcwd())}\0{machine}\0{os.getpid()}".encode())
        state_dir().mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"vg-{key.hexdigest()[:6]}-", dir=state_dir()))
        self.ssh_config = self.dir / "ssh_config"
        self.ssh_config.write_text(ssh_config)
        self.control = self.dir / "ctl"
        self.host = machine
        self._master: subprocess.Popen[bytes] | None = None
        self._spawned: dict[int, Spawned] = {}
        self._next = 1
        self._readers: dict[str, tuple[subprocess.Popen[bytes], PipeLines]] = {}
        self._kmsg: tuple[subprocess.Popen[bytes], PipeLines] | None = None
        self._sshd_pid: int | None = None
        self._crashed = False
        self._agent: RootShell | None = None
        self._agent_lock = threading.Lock()

    # -- connection ----------------------------------------------------------------

    def _ssh(self, remote: str, master: bool = False) -> list[str]:
        opts = ["-F", str(self.ssh_config), "-o", f"ControlPath={self.control}", "-o", "BatchMode=yes", "-T"]
        if master:
            opts += ["-M", "-N", "-o", "ControlPersist=no", "-o", "ServerAliveInterval=10"]
        else:
            opts += ["-o", "ControlMaster=no"]
        return ["ssh", *opts, self.host, *([remote] if remote else [])]

    def _start(self) -> None:
        with progress.step(f"connecting to {self.name} over SSH"):
            with open(self.dir / "master.log", "wb") as err:
                self._master = subprocess.Popen(
                    self._ssh("", master=True),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=self.env,
                    preexec_fn=die_with_parent,
                )
            deadline = time.monotonic() + MASTER_TIMEOUT_S
            while not self.control.exists():
                if self._master.poll() is not None or time.monotonic() > deadline:
                    log = (self.dir / "master.log").read_text(errors="replace").strip()
                    why = " ".join(log.split())[-300:] or "timed out"
                    raise KbridgeError(
                        f"cannot reach {self.name} over SSH: {why}",
                        f"try `vagrant ssh {self.machine}`; `vagrant reload {self.machine}` if it hangs",
                    )
                time.sleep(0.02)
            facts = self._facts()
        self.krel = facts.get("krel", "")
        machine = facts.get("machine", "")
        try:
            self.arch = get_arch(machine)
        except KbridgeError:
            raise KbridgeError(
                f"{self.name} runs on {machine!r}, which kbridge does not support", "use an x86_64 or arm64 machine"
            ) from None
        if int(facts.get("tainted", "0") or 0) & TAINT_DIE:
            raise KbridgeError(
                f"the kernel of {self.name} has oopsed since it booted (tainted D)", f"vagrant reload {self.machine}"
            )
        self._sshd_pid = int(facts["ppid"]) if facts.get("ppid", "").isdigit() else None
        with self._agent_lock:
            self._agent_up()  # sudo -n once, for every later command (and its refusal, said here)
        if self._sshd_pid:
            # sshd's session process carries every byte kbridge gets back: never probe it.
            # qga.pid is where sessions look for "the channel kbridge drives the guest through"
            # (qemu-guest-agent's in the embedded VM).
            pid = f"{self._sshd_pid}\n".encode()
            self.write_file(f"{RUN_DIR}/ssh.pid", pid)
            self.write_file(f"{RUN_DIR}/qga.pid", pid)
        self.flavour = "bcc" if facts.get("bcc") == "yes" else "default"
        self.accel = f"{self.provider}/" + (
            "kvm" if facts.get("kvm") == "yes" else "tcg" if self.arch.name != host_arch() else "qemu"
        )
        self.image = self._headers_image()

    def _facts(self) -> dict[str, str]:
        proc = subprocess.run(self._ssh(PROBE), capture_output=True, env=self.env, timeout=60, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 and not proc.stdout:
            raise KbridgeError(
                f"cannot run commands in {self.name}: {proc.stderr.decode(errors='replace').strip()[-300:]}"
            )
        return dict(line.split("=", 1) for line in proc.stdout.decode(errors="replace").splitlines() if "=" in line)

    def _headers_image(self) -> images.Image:
        """kbridge's image of the guest's kernel: its headers build the modules loaded here."""
        img = images.ensure(self.arch)
        if img.krel != self.krel:
            raise KbridgeError(
                f"no kernel headers for {self.krel} (the kernel of {self.name}): kbridge's {self.arch.name} "
                f"image has {img.krel}",
                f"use a box built from kbridge's image (kbridge box build --arch {self.arch.name}) or update "
                "the image (kbridge image build --rebuild)",
            )
        return img

    def release(self) -> None:
        """Close the readers, the root shell and the control master; the machine keeps running."""
        for port in list(self._readers):
            with contextlib.suppress(Exception):
                self.close_stream(port)
        if self._kmsg is not None:
            proc = self._kmsg[0]
            self._kmsg = None
            with contextlib.suppress(Exception):
                self._kill_reader("kmsg", proc)
        with contextlib.suppress(Exception):
            self._agent_down()  # last: the readers above are stopped through it
        for sp in self._spawned.values():
            if sp.proc.poll() is None:
                sp.proc.terminate()
        if self._master is not None and self._master.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run(
                    ["ssh", "-F", str(self.ssh_config), "-o", f"ControlPath={self.control}", "-O", "exit", self.host],
                    capture_output=True,
                    timeout=10,
                    env=self.env,
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._master.wait(timeout=5)
            if self._master.poll() is None:
                self._master.kill()
                self._master.wait()
        self._master = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> VagrantTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- commands ------------------------------------------------------------------

    @staticmethod
    def _wrap(argv: list[str], report_pid: bool) -> str:
        """The remote command line: ARGV as root under a shell that reports pid and status.

        The command runs as the shell's child, so a signal that kills it comes back
        as status 128+N (ssh itself would exit 255 for a killed remote process).
        """
        if not argv:
            raise KbridgeError("empty guest command")
        script = (
            'exec 3<&0; "$@" <&3 3<&- & c=$!; '
            + ('echo "$c"; ' if report_pid else "")
            + 'trap "kill \\$c 2>/dev/null" TERM HUP; wait "$c"; exit $?'
        )
        return shlex.join(["sudo", "-n", "/bin/sh", "-c", script, "kbridge", *argv])

    def _check_master(self) -> None:
        if self._master is None or self._master.poll() is not None:
            self.check_alive()
            raise GuestIOError(f"the SSH connection to {self.name} is closed")

    @staticmethod
    def _result(code: int, out: bytes, err: bytes) -> ExecResult:
        return ExecResult(code, out, err, code - 128 if 128 < code < 192 else None)

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float | None = 120) -> ExecResult:
        """Run ARGV as root in the guest and wait for it (through the root shell: one round trip)."""
        if not argv:
            raise KbridgeError("empty guest command")
        return self._shell(argv, stdin, timeout)

    def _shell(
        self, argv: list[str], stdin: bytes | None, timeout: float | None, write_to: tuple[str, str] | None = None
    ) -> ExecResult:
        with self._agent_lock:
            agent = self._agent_up()
            try:
                return agent.run(argv, stdin, timeout, write_to)
            except TimeoutError:
                self._agent_down(kill_children=True)
                raise GuestIOError(f"guest command {shlex.join(argv)[:80]!r} still running after {timeout} s") from None
            except (GuestIOError, OSError) as e:
                self._agent_down()
                self._check_master()
                raise GuestIOError(f"the root shell in {self.name} failed: {e}") from None

    def _agent_up(self) -> RootShell:
        if self._agent is not None and self._agent.proc.poll() is None:
            return self._agent
        self._check_master()
        errlog = self.dir / "agent.log"
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(
                self._ssh(shlex.join(["sudo", "-n", "/bin/sh", "-s"])),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env,
                preexec_fn=die_with_parent,
            )
        agent = RootShell(proc)
        try:
            agent.stdin.write(AGENT_SCRIPT.encode())
            agent.stdin.flush()
            agent.ready(60)
        except (TimeoutError, GuestIOError, OSError, ValueError, IndexError):
            proc.kill()
            proc.wait()
            why = " ".join(errlog.read_text(errors="replace").split())[:300]
            if "sudo" in why:
                raise KbridgeError(
                    f"sudo -n is refused in {self.name}: {why}",
                    "kbridge runs guest commands as root with sudo -n: give the SSH user "
                    "passwordless sudo (Vagrant boxes do)",
                ) from None
            raise GuestIOError(f"could not start a root shell in {self.name} (sudo -n /bin/sh): {why}") from None
        self._agent = agent
        return agent

    def _agent_down(self, kill_children: bool = False) -> None:
        agent, self._agent = self._agent, None
        if agent is None:
            return
        if kill_children and agent.pid and self._master is not None and self._master.poll() is None:
            # A command that overran its timeout: stop it, not just the shell waiting for it.
            with contextlib.suppress(Exception):
                subprocess.run(
                    self._ssh(f"sudo -n pkill -KILL -P {agent.pid}; sudo -n kill {agent.pid}"),
                    capture_output=True,
                    env=self.env,
                    timeout=30,
                    stdin=subprocess.DEVNULL,
                )
        with contextlib.suppress(OSError):
            agent.stdin.close()  # the shell exits at end of input (its trap removes its directory)
        try:
            agent.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()
        if agent.proc.stdout:
            agent.proc.stdout.close()

    def spawn(self, argv: list[str], stdin: bytes | None = None) -> int:
        """Start ARGV as root in the guest; a handle for poll()/wait()/guest_pid()."""
        self._check_master()
        # Output goes to files, not pipes: nothing to drain while it runs. Closed in _finish().
        out = tempfile.TemporaryFile(dir=self.dir)  # noqa: SIM115 - outlives this call: closed by _finish
        err = tempfile.TemporaryFile(dir=self.dir)  # noqa: SIM115 - likewise
        proc = subprocess.Popen(
            self._ssh(self._wrap(argv, True)),
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            env=self.env,
            preexec_fn=die_with_parent,
        )
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            if stdin:
                proc.stdin.write(stdin)
            proc.stdin.close()
        handle = self._next
        self._next += 1
        self._spawned[handle] = Spawned(proc, out, err)
        self.guest_pid(handle)  # one round trip: the guest has it running when spawn returns
        return handle

    def _spawned_of(self, handle: int) -> Spawned:
        try:
            return self._spawned[handle]
        except KeyError:
            raise KbridgeError(f"no guest command with handle {handle} in {self.name}") from None

    def guest_pid(self, handle: int) -> int:
        """The guest tgid of a spawned command (its first output line, written by the wrapper)."""
        sp = self._spawned_of(handle)
        deadline = time.monotonic() + 60
        while sp.guest_pid is None:
            data = os.pread(sp.out.fileno(), 32, 0)
            if b"\n" in data:
                sp.guest_pid = int(data.split(b"\n", 1)[0])
                break
            if sp.proc.poll() is not None or time.monotonic() > deadline:
                err = os.pread(sp.err.fileno(), 300, 0).decode(errors="replace").strip()
                raise GuestIOError(f"guest command did not start in {self.name}: {err or 'no pid reported'}")
            time.sleep(0.005)
        return sp.guest_pid

    def poll(self, pid: int) -> ExecResult | None:
        """The result of spawned command PID (a handle), or None while it runs."""
        sp = self._spawned_of(pid)
        if sp.result is None:
            code = sp.proc.poll()
            if code is None:
                return None
            sp.result = self._finish(sp, code)
        return sp.result

    def wait(self, pid: int, timeout: float | None = None) -> ExecResult:
        """Wait for spawned command PID (a handle); GuestIOError after TIMEOUT s."""
        sp = self._spawned_of(pid)
        if sp.result is None:
            try:
                code = sp.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise GuestIOError(f"guest command (handle {pid}) still running after {timeout} s") from None
            sp.result = self._finish(sp, code)
        return sp.result

    def _finish(self, sp: Spawned, code: int) -> ExecResult:
        sp.out.seek(0)
        sp.err.seek(0)
        out, err = sp.out.read(), sp.err.read()
        sp.out.close()
        sp.err.close()
        if code == 255 and not out:
            self._check_master()
        out = out.split(b"\n", 1)[1] if b"\n" in out else b""  # the pid line
        return self._result(code, out, err)

    def write_file(self, path: str, data: bytes, mode: str = "w") -> None:
        """Write DATA to PATH; mode "a" appends. One write(2) (a tracefs file parses each write)."""
        if mode not in ("w", "a"):
            raise KbridgeError(f"unknown write mode {mode!r}")
        res = self._shell([], data, 60, write_to=(path, mode))
        if not res.ok:
            lines = res.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1].rsplit(":", 1)[-1].strip() if lines else f"exit {res.exitcode}"
            raise GuestIOError(f"writing {path} in {self.name} failed: {why}")

    def read_file(self, path: str) -> bytes:
        """The bytes of PATH in the guest."""
        res = self.run(["cat", path], timeout=60)
        if not res.ok:
            why = res.stderr.decode(errors="replace").strip().rsplit(":", 1)[-1].strip() or f"exit {res.exitcode}"
            raise GuestIOError(f"reading {path} in {self.name} failed: {why}")
        return res.stdout

    def read_chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        """PATH's bytes, SIZE at a time: one dd per chunk on the root shell."""
        n = 0
        while True:
            res = self.run(["dd", f"if={path}", f"bs={size}", f"skip={n}", "count=1", "status=none"], timeout=60)
            if not res.ok:
                why = res.stderr.decode(errors="replace").strip().rsplit(":", 1)[-1].strip() or f"exit {res.exitcode}"
                raise GuestIOError(f"reading {path} in {self.name} failed: {why}")
            if not res.stdout:
                return
            yield res.stdout
            if len(res.stdout) < size:
                return
            n += 1

    # -- streams -------------------------------------------------------------------

    def _reader(
        self, what: str, remote_argv: list[str], hold_stdin: bool = False
    ) -> tuple[subprocess.Popen[bytes], PipeLines]:
        """A long-lived `ssh ... sudo sh -c 'echo $$ > PIDFILE; echo $$; exec ARGV'` whose stdout we read.

        Returns once the guest process has written its pid (file and first line), so a
        probe armed after this call already knows to exclude it.
        """
        pidfile = f"{RUN_DIR}/{what}.pid"
        script = f'mkdir -p {RUN_DIR}; echo $$ > {pidfile}; echo $$; exec "$@"'
        remote = shlex.join(["sudo", "-n", "/bin/sh", "-c", script, "kbridge", *remote_argv])
        # HOLD_STDIN: the guest side waits on its stdin, which ends when this ssh goes away.
        proc = subprocess.Popen(
            self._ssh(remote),
            stdin=subprocess.PIPE if hold_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=die_with_parent,
        )
        assert proc.stdout is not None
        lines = PipeLines(proc.stdout, what, self.name, self.check_alive)
        lines.idle = 0.2
        deadline = time.monotonic() + 60
        first = None
        while first is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise GuestIOError(f"the {what} reader did not start in {self.name}")
            first = next(lines)
        if not first.strip().isdigit():
            proc.kill()
            proc.wait()
            raise GuestIOError(f"the {what} reader in {self.name} said {first[:80]!r} instead of its pid")
        return proc, lines

    def _kill_reader(self, what: str, proc: subprocess.Popen[bytes]) -> None:
        pidfile = f"{RUN_DIR}/{what}.pid"
        if proc.stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._master is not None and self._master.poll() is None:
            self.run(["/bin/sh", "-c", f'[ -s {pidfile} ] && kill "$(cat {pidfile})"; rm -f {pidfile}'], timeout=10)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def kmsg(self, idle: float = 0.05) -> Iterator[KmsgRecord | None]:
        """Kernel log records as they arrive; the first read replays the log buffer."""
        if self._kmsg is None or self._kmsg[0].poll() is not None:
            self._kmsg = self._reader("kmsg", ["cat", "/dev/kmsg"])
        self._kmsg[1].idle = idle
        return KmsgRecords(self._kmsg[1])

    def stream_path(self, port: str) -> str:
        """The guest path a program writes to so its lines arrive on stream PORT.

        stream() makes it a link to the stdout of a holder process, which is the SSH
        channel itself: the writer's bytes go straight to sshd, and no relay process
        (which a probe on the write path would see) sits in between.
        """
        if port not in STREAM_PORTS:
            raise KbridgeError(f"unknown stream port {port!r}")
        return f"{RUN_DIR}/{port}"

    def stream(self, port: str, idle: float = 0.05) -> PipeLines:
        """The host end of stream PORT, open before the guest writes; writers come and go."""
        link = self.stream_path(port)
        if port not in self._readers or self._readers[port][0].poll() is not None:
            # The holder never writes; it keeps the channel open between writers (like a
            # virtio-serial port) until its stdin ends: when we close it, or when kbridge dies.
            script = 'ln -sfn "/proc/$$/fd/1" "$1" && read -r _; rm -f "$1"'
            self._readers[port] = self._reader(port, ["/bin/sh", "-c", script, "kbridge", link], hold_stdin=True)
            deadline = time.monotonic() + 30
            while not self.run(["test", "-L", link], timeout=30).ok:
                if self._readers[port][0].poll() is not None or time.monotonic() > deadline:
                    raise KbridgeError(f"could not open stream {port} in {self.name}")
                time.sleep(0.05)
        reader = self._readers[port][1]
        reader.idle = idle
        return reader

    def close_stream(self, port: str) -> None:
        """Stop the reader of stream PORT and remove its link."""
        if entry := self._readers.pop(port, None):
            self._kill_reader(port, entry[0])
            with contextlib.suppress(Exception):
                self.run(["rm", "-f", self.stream_path(port)], timeout=10)

    def plumbing_pids(self) -> list[int]:
        """Guest tgids that carry kbridge's own traffic (sshd's session, the readers): never probed."""
        names = ["kmsg", *self._readers]
        script = "; ".join(f"cat {RUN_DIR}/{n}.pid 2>/dev/null" for n in names) + "; true"
        pids: list[int] = []
        with contextlib.suppress(KbridgeError):
            pids += [int(x) for x in self.run(["/bin/sh", "-c", script], timeout=10).text.split() if x.isdigit()]
        pids += [p for p in (self._sshd_pid, self._agent.pid if self._agent else None) if p]
        return sorted(set(pids))

    def describe(self) -> dict:
        """What a status listing shows of it."""
        return {
            "target": self.name,
            "arch": self.arch.name,
            "kernel": self.krel,
            "accel": self.accel,
            "flavour": self.flavour,
            "machine": self.machine,
            "provider": self.provider,
        }

    def bcc_python(self) -> list[str] | None:
        """python3 with bcc (python3-bpfcc), run as root, or None when the box has none."""
        return ["/usr/bin/python3"] if self.flavour == "bcc" else None

    # -- health --------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise GuestCrash if the guest kernel oopsed (tainted D) or stopped answering after a panic."""
        if self._crashed:
            raise GuestCrash(f"the kernel of {self.name} oopsed", self.console_tail())
        if self._master is None or self._master.poll() is not None:
            console = self.console_tail(60)
            if oops.is_oops(console):
                self._crashed = True
                raise GuestCrash(f"the kernel of {self.name} panicked", console)
            return
        proc = subprocess.run(
            self._ssh("cat /proc/sys/kernel/tainted"),
            capture_output=True,
            env=self.env,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        text = proc.stdout.decode().strip()
        if proc.returncode == 0 and text.isdigit() and int(text) & TAINT_DIE:
            self._crashed = True
            raise GuestCrash(f"the kernel of {self.name} oopsed", self.console_tail())

    def crashed(self) -> bool:
        return self._crashed

    def mark_crashed(self, report: Path | None = None) -> None:
        """The guest oopsed: kbridge cannot restart a Vagrant machine, so it says how."""
        self._crashed = True
        progress.warn(f"the kernel of {self.name} oopsed: `vagrant reload {self.machine}` restarts it")

    def _dmesg(self) -> list[str]:
        res = self.run(["dmesg"], timeout=30)
        return res.text.splitlines() if res.ok else []

    def log_mark(self) -> int:
        """The kernel log's length now (dmesg over the root shell)."""
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
        """The end of the kernel log (dmesg over SSH), else of the libvirt serial console log."""
        if self._master is not None and self._master.poll() is None:
            with contextlib.suppress(Exception):
                res = self.run(["dmesg"], timeout=20)
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
            uuid = (dotdir(self.env) / "machines" / self.machine / "libvirt" / "id").read_text().strip()
            xml = subprocess.run(
                ["virsh", "-c", "qemu:///system", "dumpxml", uuid], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        m = re.search(r"<serial type='file'>\s*<source path='([^']+)'", xml)
        return Path(m.group(1)) if m else None


def connect(machine: str | None, vagrantfile_dir: Path | None = None) -> VagrantTarget:
    """The running Vagrant machine MACHINE (None: the Vagrantfile's primary machine)."""
    if shutil.which("vagrant") is None:
        raise KbridgeError("vagrant is not installed", INSTALL_HINT)
    if shutil.which("ssh") is None:
        raise KbridgeError(
            "ssh is not installed (kbridge drives Vagrant machines over OpenSSH)", "sudo apt-get install openssh-client"
        )
    env = dict(os.environ)
    where = "the current directory"
    if vagrantfile_dir is not None:
        if not (Path(vagrantfile_dir) / "Vagrantfile").is_file():
            raise KbridgeError(
                f"no Vagrantfile in {str(vagrantfile_dir)!r}", "give the directory that holds the Vagrantfile"
            )
        env["VAGRANT_CWD"] = str(Path(vagrantfile_dir).resolve())
        where = str(vagrantfile_dir)
    elif env.get("VAGRANT_CWD"):
        where = env["VAGRANT_CWD"]
    elif "VAGRANT_CWD" in env:
        del env["VAGRANT_CWD"]  # set but empty: Vagrant would refuse it
    # `vagrant ssh-config` succeeds only for a running machine: one Vagrant call on the
    # usual path; `vagrant status` says why when it fails.
    cfg = vagrant_cmd(["ssh-config", *([machine] if machine else [])], env)
    hosts = re.findall(r"^Host (\S+)", cfg.stdout, re.M)
    if machine is None and len(hosts) > 1:
        # Without a name, ssh-config answers for every running machine.
        raise KbridgeError(
            f"several machines of the Vagrantfile in {where} are running",
            "name one: --target " + ", ".join(f"vagrant:{h}" for h in hosts),
        )
    if len(hosts) != 1 or (machine is not None and cfg.returncode != 0):
        explain_not_ready(machine, env, where, vagrant_message(cfg))
    if machine is None:  # the one running machine: only its block is kept
        machine = hosts[0]
        cfg = subprocess.CompletedProcess(cfg.args, 0, host_block(cfg.stdout, machine), "")
    provider = provider_of(env, machine)
    target = VagrantTarget(machine, cfg.stdout, provider, env)
    try:
        target._start()
    except BaseException:
        target.release()
        raise
    return target
