"""The OpenSSH connection to a Vagrant machine: its control master and the channels on it.

One control master per connection; on it, kbridge's agent (kbridge/guest/agent.c, installed
in the guest's /tmp for the connection) runs every command and file operation as root,
holding the machine's lock so that two kbridge commands never drive one machine at once,
and each reader (the kernel log, a trace/bpf stream) gets a channel of its own. Every
helper is known by tgid from the moment it starts, before anything is armed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from kbridge import progress
from kbridge.errors import KbridgeError
from kbridge.paths import state_dir
from kbridge.targets.base import GuestIOError
from kbridge.targets.vagrant import machine as machines
from kbridge.targets.vagrant.agent import (
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
LOCK_WAIT_S = 600.0  # another kbridge command using the machine (the kept VM waits as long)


class Connection:
    """One OpenSSH control master to MACHINE, with kbridge's agent and readers on it."""

    def __init__(
        self, machine: str, name: str, ssh_config: str, env: dict[str, str], check_alive: Callable[[], None]
    ) -> None:
        self.machine = machine
        self.name = name
        self.env = env
        self.ssh_options = machines.ssh_options(ssh_config, machine)
        self.conn_id = secrets.token_hex(6)
        self.control = control_path(self.conn_id)
        self.master: subprocess.Popen[bytes] | None = None
        self.agent: Agent | None = None
        self.helpers: dict[str, Helper] = {}
        self._lock = threading.RLock()  # one agent request at a time
        self._check_alive = check_alive  # the target's: says GuestCrash when the channel died of an oops

    def ssh(self, command: str | None, master: bool = False) -> list[str]:
        opts = ["-F", "/dev/null", *self.ssh_options, "-o", f"ControlPath={self.control}", "-o", "BatchMode=yes"]
        if master:
            opts += ["-M", "-N", "-o", "ControlPersist=no", "-o", "ServerAliveInterval=10"]
        else:
            opts += ["-o", "ControlMaster=no", "-T"]
        return ["ssh", *opts, self.machine, *([command] if command else [])]

    def open(self) -> None:
        """Start the control master, then the agent on it (sudo -n once, the machine's lock)."""
        self.master = subprocess.Popen(
            self.ssh(None, master=True),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + MASTER_TIMEOUT_S
        while not os.path.exists(self.control):
            if self.master.poll() is not None or time.monotonic() > deadline:
                if self.master.poll() is None:
                    self.master.kill()
                _, log = self.master.communicate()
                why = " ".join(log.decode(errors="replace").split())[-300:] or "timed out"
                raise KbridgeError(
                    f"cannot reach {self.name} over SSH: {why}",
                    f"try `vagrant ssh {self.machine}`; `vagrant reload {self.machine}` if it hangs",
                )
            time.sleep(0.02)
        with self._lock:
            self.agent_up()

    def alive(self) -> bool:
        """Whether the control master still runs."""
        return self.master is not None and self.master.poll() is None

    def close(self) -> None:
        """Stop the agent, then the control master; remove its socket. The readers are closed already."""
        with contextlib.suppress(Exception):
            self.agent_down()
        if self.master is not None and self.master.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run(
                    ["ssh", "-o", f"ControlPath={self.control}", "-O", "exit", self.machine],
                    capture_output=True,
                    timeout=10,
                    env=self.env,
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.master.wait(timeout=5)
            if self.master.poll() is None:
                self.master.kill()
                self.master.wait()
        if self.master is not None and self.master.stderr:
            self.master.stderr.close()
        self.master = None
        with contextlib.suppress(OSError):
            os.unlink(self.control)

    # -- the agent -----------------------------------------------------------------

    def check_master(self) -> None:
        if not self.alive():
            self._check_alive()
            raise GuestIOError(f"the SSH connection to {self.name} is closed")

    def agent_up(self) -> Agent:
        if self.agent is not None and self.agent.proc.poll() is None:
            return self.agent
        self.check_master()
        proc = subprocess.Popen(
            self.ssh(remote(install_argv(self.conn_id))),
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
        self.agent = agent
        self.helpers["agent"] = helper
        return agent

    def agent_down(self) -> None:
        """Close the agent's channel: it stops what it runs, removes its files and the machine's lock."""
        agent, self.agent = self.agent, None
        self.helpers.pop("agent", None)
        if agent is not None:
            close_reader(agent.proc)

    def call(self, fn: Callable[[Agent], _T]) -> _T:
        """FN's request to the agent (started if it is not running), one at a time."""
        with self._lock:
            agent = self.agent_up()
            try:
                return fn(agent)
            except GuestIOError:
                self.agent_down()
                self.check_master()
                raise
            except BaseException:
                # Interrupted mid-request (Ctrl-C, a timeout): its framing is lost. The next call
                # starts a fresh agent (the old one stops what it ran when its channel closes).
                self.agent_down()
                raise

    # -- readers -------------------------------------------------------------------

    def reader(self, what: str, mode: str, arg: str) -> tuple[subprocess.Popen[bytes], PipeLines]:
        """`agent copy|hold` on a channel of its own, once it has said its pids (so a probe armed after
        this call already excludes it). Its stdin stays open: it ends when kbridge closes it or dies."""
        self.check_master()
        with self._lock:
            self.agent_up()  # installs the agent binary the helper runs
        proc = subprocess.Popen(
            self.ssh(remote(helper_argv(self.conn_id, mode, arg))),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            preexec_fn=die_with_parent,
        )
        assert proc.stdout is not None
        lines = PipeLines(proc.stdout, what, self.name, self._check_alive)
        lines.idle = 0.2
        deadline = time.monotonic() + 60
        first = None
        try:
            while first is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise GuestIOError(f"the {what} reader did not start in {self.name}")
                first = next(lines)
            self.helpers[what] = Helper(*parse_lineage(first))
        except BaseException:
            close_reader(proc)
            raise
        return proc, lines

    def end_reader(self, what: str, proc: subprocess.Popen[bytes]) -> None:
        """Close reader WHAT (its helper's pids are no longer kbridge's)."""
        self.helpers.pop(what, None)
        close_reader(proc)

    def plumbing_pids(self) -> list[int]:
        """Guest tgids of kbridge's own helpers (the agent, the readers, their sudo and sshd)."""
        return sorted({p for h in self.helpers.values() for p in h.pids})


def close_reader(proc: subprocess.Popen[bytes]) -> None:
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


def control_path(conn_id: str) -> str:
    """The control master's socket: in kbridge's state directory (short enough for a socket path)."""
    d = state_dir() / "vagrant"
    d.mkdir(parents=True, exist_ok=True)
    path = str(d / f"ssh-{conn_id}")
    if len(path) > 90:  # sun_path is 108 bytes, and ssh adds a suffix while it creates the socket
        path = f"/tmp/kbridge-ssh-{os.getuid()}-{conn_id}"
    return path
