"""A Vagrant machine as a kbridge target, driven over OpenSSH.

The machine is found the way Vagrant users expect: `vagrant ssh-config` (and
`vagrant status`, to say why when that fails) of the Vagrantfile in the current
directory, in VAGRANT_CWD, or in the directory given. kbridge opens one SSH
control master to it; every channel below is a session on that one connection:

  run, files    a root shell (`sudo -n /bin/sh -s`) kept open: each command is one
                round trip, framed by a random marker, its stdout straight on the
                channel (no sudo, PAM or login shell per command: ~1 s each under TCG)
  spawn         `ssh ... sudo sh -c 'echo $$; exec ...'`: the guest pid first, the
                result when the ssh process ends
  kmsg          `sudo cat /dev/kmsg`
  streams       /run/kbridge/<port>, a link to the stdout of a holder process,
                which is the channel itself: trace_pipe or bcc output goes from the
                writer to sshd with no relay process a probe would see

kbridge never destroys, halts or reboots a machine it did not create: release()
only closes the control master and the readers it started.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NoReturn

from kbridge import progress
from kbridge.arch import Arch, get_arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.paths import state_dir
from kbridge.targets.base import OOPS_MARKERS, STREAM_PORTS, GuestCrash, KmsgRecord, KmsgRecords
from kbridge.targets.qga import ChannelError, ExecResult

RUN_DIR = "/run/kbridge"  # guest-side stream links, pid files, the root shell's directory
TAINT_DIE = 1 << 7  # /proc/sys/kernel/tainted 'D': the kernel oopsed since boot
MASTER_TIMEOUT_S = 30.0
_INSTALL = "sudo apt-get install vagrant vagrant-libvirt"
# Runs as the SSH user (no sudo) so that $PPID is sshd's session process, which
# carries every channel of the control master: it writes what the guest sends us.
_PROBE = (
    'echo "ppid=$PPID"; echo "krel=$(uname -r)"; echo "machine=$(uname -m)"; '
    'echo "tainted=$(cat /proc/sys/kernel/tainted)"; '
    "[ -e /usr/lib/python3/dist-packages/bcc/__init__.py ] && echo bcc=yes; "
    "dmesg 2>/dev/null | grep -q 'Hypervisor detected: KVM' && echo kvm=yes; "
    "true"
)


def _die_with_parent() -> None:
    """In the child: SIGTERM when kbridge dies, so no ssh reader or master outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _vagrant(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["vagrant", *args], capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise KbridgeError(f"`vagrant {' '.join(args)}` did not answer within {timeout:.0f} s") from None


def _vagrant_message(proc: subprocess.CompletedProcess[str]) -> str:
    """Vagrant's own error text, on one line."""
    text = proc.stderr.strip() or proc.stdout.strip()
    for line in proc.stdout.splitlines():  # --machine-readable puts errors in error-exit rows
        parts = line.split(",", 4)
        if len(parts) == 5 and parts[2] == "error-exit":
            text = parts[4].replace("\\n", " ")
    return " ".join(text.split())[:400]


def parse_status(text: str) -> dict[str, tuple[str, str]]:
    """`vagrant status --machine-readable` -> {machine: (state, provider)}."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split(",", 3)
        if len(parts) < 4 or not parts[1]:
            continue
        entry = found.setdefault(parts[1], ["", ""])
        if parts[2] == "state":
            entry[0] = parts[3]
        elif parts[2] == "provider-name" or (parts[2] == "metadata" and parts[3].startswith("provider,")):
            entry[1] = parts[3].split(",")[-1]
    return {k: (v[0], v[1]) for k, v in found.items()}


def _plugin_missing(env: dict[str, str]) -> bool:
    proc = _vagrant(["plugin", "list"], env, timeout=60)
    return "vagrant-libvirt" not in proc.stdout


def connect(machine: str | None, vagrantfile_dir: Path | None = None) -> VagrantTarget:
    """The running Vagrant machine MACHINE (None: the Vagrantfile's primary machine)."""
    if shutil.which("vagrant") is None:
        raise KbridgeError("vagrant is not installed", _INSTALL)
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
    cfg = _vagrant(["ssh-config", *([machine] if machine else [])], env)
    hosts = re.findall(r"^Host (\S+)", cfg.stdout, re.M)
    if machine is None and len(hosts) > 1:
        # Without a name, ssh-config answers for every running machine.
        raise KbridgeError(
            f"several machines of the Vagrantfile in {where} are running",
            "name one: --target " + ", ".join(f"vagrant:{h}" for h in hosts),
        )
    if len(hosts) != 1 or (machine is not None and cfg.returncode != 0):
        _explain_not_ready(machine, env, where, _vagrant_message(cfg))
    if machine is None:  # the one running machine: only its block is kept
        machine = hosts[0]
        cfg = subprocess.CompletedProcess(cfg.args, 0, _host_block(cfg.stdout, machine), "")
    provider = _provider(env, machine)
    target = VagrantTarget(machine, cfg.stdout, provider, env)
    try:
        target._start()
    except BaseException:
        target.release()
        raise
    return target


def _host_block(ssh_config: str, host: str) -> str:
    """The `Host HOST` block of an ssh-config text."""
    m = re.search(rf"^Host {re.escape(host)}\n(?:(?!Host ).*\n?)*", ssh_config, re.M)
    return m.group(0) if m else ""


def _dotdir(env: dict[str, str]) -> Path:
    """Where Vagrant keeps the machines' state (.vagrant beside the Vagrantfile)."""
    if env.get("VAGRANT_DOTFILE_PATH"):
        return Path(env["VAGRANT_DOTFILE_PATH"])
    return Path(env.get("VAGRANT_CWD") or os.getcwd()) / ".vagrant"


def _provider(env: dict[str, str], machine: str) -> str:
    """The provider that created MACHINE (.vagrant/machines/NAME/PROVIDER/id)."""
    with contextlib.suppress(OSError):
        for p in sorted((_dotdir(env) / "machines" / machine).iterdir()):
            if (p / "id").is_file():
                return p.name
    return "vagrant"


def _explain_not_ready(machine: str | None, env: dict[str, str], where: str, ssh_config_error: str) -> NoReturn:
    """Raise the one-line reason a machine cannot be reached: no Vagrantfile, no such machine,
    a missing plugin, not created, not running."""
    status = _vagrant(["status", "--machine-readable", *([machine] if machine else [])], env)
    if status.returncode != 0:
        msg = _vagrant_message(status)
        if "provider" in msg.lower() and "libvirt" in msg and _plugin_missing(env):
            raise KbridgeError(f"the vagrant-libvirt plugin is missing: {msg}", _INSTALL)
        if "not found configured" in msg or "was not found" in msg:
            raise KbridgeError(
                f"no machine {machine!r} in the Vagrantfile of {where}: {msg}",
                "see `vagrant status` for the machine names",
            )
        if "A Vagrant environment or target machine is required" in msg:
            raise KbridgeError(
                f"no Vagrantfile in {where}",
                "cd to the directory with the Vagrantfile, or pass --vagrantfile DIR / set VAGRANT_CWD",
            )
        raise KbridgeError(f"vagrant status failed: {msg}")
    machines = parse_status(status.stdout)
    if machine is None:
        if len(machines) != 1:
            names = ", ".join(f"vagrant:{n}" for n in machines)
            raise KbridgeError(
                f"no machine of the Vagrantfile in {where} is running",
                f"vagrant up, then --target vagrant (or name one: --target {names})",
            )
        machine = next(iter(machines))
    state, provider = machines.get(machine, ("", ""))
    if provider == "libvirt" and _plugin_missing(env):
        raise KbridgeError(f"the vagrant-libvirt plugin is missing (the provider of {machine})", _INSTALL)
    if state != "running":
        why = {"not_created": "not created", "shutoff": "shut off", "": "in an unknown state"}.get(state, state)
        raise KbridgeError(f"vagrant machine {machine!r} is {why}", f"vagrant up {machine}")
    raise KbridgeError(f"vagrant ssh-config {machine} failed: {ssh_config_error}", f"vagrant reload {machine}")


# A root shell kept open over one SSH channel runs run()'s commands: no sudo, PAM or
# login-shell start per command (under TCG those cost ~0.5-1 s each). Commands run one
# at a time; each is framed by a random marker the host chose, its stdout goes straight
# to the channel (as qemu-guest-agent's exec output does, so the only writes are the
# command's own), stderr through a file.
_AGENT = r"""
d=/run/kbridge/agent.$$
mkdir -p "$d" && : > "$d/in" || exit 1
echo "$$" > /run/kbridge/agent.pid
kb_in() { base64 -d > "$d/in"; }
kb_run() {
    m=$1; shift
    printf 'KB<%s\n' "$m"
    ( exec "$@" ) < "$d/in" 2> "$d/err"
    rc=$?
    printf '\nKB>%s %s\n' "$m" "$rc"
    if [ -s "$d/err" ]; then printf 'KBERR %s\n' "$(wc -c < "$d/err")"; cat "$d/err"; else printf 'KBERR 0\n'; fi
    : > "$d/in"
}
kb_write() {
    printf 'KB<%s\n' "$1"
    if [ "$2" = a ]; then cat "$d/in" >> "$3"; else cat "$d/in" > "$3"; fi 2> "$d/err"
    rc=$?
    printf '\nKB>%s %s\n' "$1" "$rc"
    if [ -s "$d/err" ]; then printf 'KBERR %s\n' "$(wc -c < "$d/err")"; cat "$d/err"; else printf 'KBERR 0\n'; fi
    : > "$d/in"
}
trap 'rm -rf "$d"' EXIT
printf 'KBREADY %s\n' "$$"
"""


class _Agent:
    """The host end of the root shell: send a framed command, read its framed result."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.pid = 0

    def _fill(self, deadline: float | None) -> None:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            raise TimeoutError
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            raise ChannelError("the guest's root shell closed")
        self.buf += chunk

    def _until(self, token: bytes, deadline: float | None) -> bytes:
        while (i := self.buf.find(token)) < 0:
            self._fill(deadline)
        head, self.buf = self.buf[:i], self.buf[i + len(token) :]
        return head

    def _exactly(self, n: int, deadline: float | None) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        head, self.buf = self.buf[:n], self.buf[n:]
        return head

    def ready(self, timeout: float) -> None:
        line = self._until(b"\n", time.monotonic() + timeout)
        self.pid = int(line.split(b"KBREADY ", 1)[1])

    def run(
        self, argv: list[str], stdin: bytes | None, timeout: float | None, write_to: tuple[str, str] | None = None
    ) -> ExecResult:
        """Run ARGV with STDIN; or, with WRITE_TO (path, "w" | "a"), write STDIN to path in one write(2)."""
        mark = secrets.token_hex(8)
        text = ""
        if stdin:
            b64 = base64.encodebytes(stdin).decode()
            text += f"kb_in <<'KBIN{mark}'\n{b64}KBIN{mark}\n"
        if write_to is not None:
            text += "kb_write " + shlex.join([mark, write_to[1], write_to[0]]) + "\n"
        else:
            text += "kb_run " + shlex.join([mark, *argv]) + "\n"
        self.stdin.write(text.encode())
        self.stdin.flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._until(f"KB<{mark}\n".encode(), deadline)
        out = self._until(f"\nKB>{mark} ".encode(), deadline)
        code = int(self._until(b"\n", deadline))
        size = int(self._until(b"\n", deadline).split(b"KBERR ", 1)[1])
        err = self._exactly(size, deadline)
        return ExecResult(code, out, err, code - 128 if 128 < code < 192 else None)


class PipeLines:
    """Lines from a host pipe (an ssh reader); None after `idle` s without data.

    An iterator object rather than a generator: an exception (Ctrl-C) raised while
    it waits leaves it usable, so cleanup can keep reading.
    """

    def __init__(self, stream: IO[bytes], what: str, target: VagrantTarget) -> None:
        self.fd = stream.fileno()
        self.what = what
        self.target = target
        self.idle = 0.05
        self.buf = b""
        self.lines: list[bytes] = []

    def __iter__(self) -> PipeLines:
        return self

    def __next__(self) -> str | None:
        while not self.lines:
            ready, _, _ = select.select([self.fd], [], [], self.idle)
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                self.target.check_alive()
                raise KbridgeError(f"the stream {self.what} from {self.target.name} closed")
            *self.lines, self.buf = (self.buf + chunk).split(b"\n")
        return self.lines.pop(0).decode(errors="replace")


class _Spawned:
    """A guest command started over SSH: its host ssh process and output files."""

    def __init__(self, proc: subprocess.Popen[bytes], out: IO[bytes], err: IO[bytes]) -> None:
        self.proc = proc
        self.out = out
        self.err = err
        self.guest_pid: int | None = None
        self.result: ExecResult | None = None


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
        self._spawned: dict[int, _Spawned] = {}
        self._next = 1
        self._readers: dict[str, tuple[subprocess.Popen[bytes], PipeLines]] = {}
        self._kmsg: tuple[subprocess.Popen[bytes], PipeLines] | None = None
        self._sshd_pid: int | None = None
        self._crashed = False
        self._agent: _Agent | None = None
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
                    preexec_fn=_die_with_parent,
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
        proc = subprocess.run(
            self._ssh(_PROBE), capture_output=True, env=self.env, timeout=60, stdin=subprocess.DEVNULL
        )
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
            raise ChannelError(f"the SSH connection to {self.name} is closed")

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
                raise ChannelError(f"guest command {shlex.join(argv)[:80]!r} still running after {timeout} s") from None
            except (ChannelError, OSError) as e:
                self._agent_down()
                self._check_master()
                raise ChannelError(f"the root shell in {self.name} failed: {e}") from None

    def _agent_up(self) -> _Agent:
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
                preexec_fn=_die_with_parent,
            )
        agent = _Agent(proc)
        try:
            agent.stdin.write(_AGENT.encode())
            agent.stdin.flush()
            agent.ready(60)
        except (TimeoutError, ChannelError, OSError, ValueError, IndexError):
            proc.kill()
            proc.wait()
            why = " ".join(errlog.read_text(errors="replace").split())[:300]
            if "sudo" in why:
                raise KbridgeError(
                    f"sudo -n is refused in {self.name}: {why}",
                    "kbridge runs guest commands as root with sudo -n: give the SSH user "
                    "passwordless sudo (Vagrant boxes do)",
                ) from None
            raise ChannelError(f"could not start a root shell in {self.name} (sudo -n /bin/sh): {why}") from None
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
            preexec_fn=_die_with_parent,
        )
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            if stdin:
                proc.stdin.write(stdin)
            proc.stdin.close()
        handle = self._next
        self._next += 1
        self._spawned[handle] = _Spawned(proc, out, err)
        self.guest_pid(handle)  # one round trip: the guest has it running when spawn returns
        return handle

    def _spawned_of(self, handle: int) -> _Spawned:
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
                raise ChannelError(f"guest command did not start in {self.name}: {err or 'no pid reported'}")
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
        """Wait for spawned command PID (a handle); ChannelError after TIMEOUT s."""
        sp = self._spawned_of(pid)
        if sp.result is None:
            try:
                code = sp.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ChannelError(f"guest command (handle {pid}) still running after {timeout} s") from None
            sp.result = self._finish(sp, code)
        return sp.result

    def _finish(self, sp: _Spawned, code: int) -> ExecResult:
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
            raise ChannelError(f"writing {path} in {self.name} failed: {why}")

    def read_file(self, path: str) -> bytes:
        """The bytes of PATH in the guest."""
        res = self.run(["cat", path], timeout=60)
        if not res.ok:
            why = res.stderr.decode(errors="replace").strip().rsplit(":", 1)[-1].strip() or f"exit {res.exitcode}"
            raise ChannelError(f"reading {path} in {self.name} failed: {why}")
        return res.stdout

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
            preexec_fn=_die_with_parent,
        )
        assert proc.stdout is not None
        lines = PipeLines(proc.stdout, what, self)
        lines.idle = 0.2
        deadline = time.monotonic() + 60
        first = None
        while first is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise ChannelError(f"the {what} reader did not start in {self.name}")
            first = next(lines)
        if not first.strip().isdigit():
            proc.kill()
            proc.wait()
            raise ChannelError(f"the {what} reader in {self.name} said {first[:80]!r} instead of its pid")
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
            if any(m in console for m in OOPS_MARKERS):
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

    def mark_crashed(self) -> None:
        """The guest oopsed: kbridge cannot restart a Vagrant machine, so it says how."""
        self._crashed = True
        progress.warn(f"the kernel of {self.name} oopsed: `vagrant reload {self.machine}` restarts it")

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
            uuid = (_dotdir(self.env) / "machines" / self.machine / "libvirt" / "id").read_text().strip()
            xml = subprocess.run(
                ["virsh", "-c", "qemu:///system", "dumpxml", uuid], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        m = re.search(r"<serial type='file'>\s*<source path='([^']+)'", xml)
        return Path(m.group(1)) if m else None


def readiness() -> list[dict]:
    """`kbridge doctor`'s Vagrant checks (all optional): vagrant, the libvirt plugin, libvirtd, boxes."""
    from kbridge.arch import ARCHES
    from kbridge.images import box as boxes

    def row(check: str, ok: bool, detail: str) -> dict:
        return {"check": check, "ok": ok, "detail": detail, "package": None, "optional": True}

    if shutil.which("vagrant") is None:
        return [row("vagrant", False, f"not installed (for --target vagrant:NAME): {_INSTALL}")]
    env = dict(os.environ)
    version = _vagrant(["--version"], env, timeout=60).stdout.strip()
    res = [row("vagrant", True, version or "installed")]
    plugins = _vagrant(["plugin", "list"], env, timeout=60).stdout
    m = re.search(r"vagrant-libvirt \(([^)]*)\)", plugins)
    res.append(row("vagrant-libvirt", bool(m), m.group(1) if m else f"plugin missing: {_INSTALL}"))
    sock = Path("/run/libvirt/libvirt-sock")
    if shutil.which("virsh"):
        proc = subprocess.run(
            ["virsh", "-c", "qemu:///system", "version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        first = (proc.stdout or proc.stderr).strip().splitlines()
        res.append(
            row(
                "libvirtd",
                proc.returncode == 0,
                first[0]
                if proc.returncode == 0 and first
                else f"qemu:///system does not answer ({' '.join(first)[:120]}): start libvirtd "
                "(sudo systemctl start libvirtd) and join the libvirt group",
            )
        )
    else:
        res.append(row("libvirtd", sock.exists(), "install libvirt-daemon-system libvirt-clients"))
    added = boxes.added_boxes()
    for a in ARCHES.values():
        box = boxes.load(a)
        name = boxes.box_name(a)
        if box is None:
            res.append(row(f"box {name}", False, f"not built: kbridge box build --arch {a.name}"))
        else:
            ok = box.version in added.get(name, [])
            res.append(
                row(
                    f"box {name}",
                    ok,
                    f"{box.krel}, version {box.version}"
                    + ("" if ok else f", not added to Vagrant: kbridge box build --arch {a.name}"),
                )
            )
    return res
