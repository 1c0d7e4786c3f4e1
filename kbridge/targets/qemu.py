"""The embedded QEMU target: kbridge boots its own image and owns the QEMU process.

A VM is a directory (sockets, console log, vm.json) plus a QEMU process recorded
by pid and start time, so a stale pid that now belongs to something else is never
mistaken for it. Ephemeral VMs die with kbridge (PR_SET_PDEATHSIG) and are shut
down on exit, Ctrl-C or error; a kept VM (`kbridge vm up`) outlives the command
and is reused by later ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil

from kbridge import progress
from kbridge.arch import Arch, host_arch
from kbridge.errors import KbridgeError
from kbridge.images.image import DEFAULT_SUITE, Image
from kbridge.paths import cache_dir, state_dir
from kbridge.targets import snapshot
from kbridge.targets.base import OOPS_MARKERS, STREAM_PORTS, GuestCrash, KmsgRecord, KmsgRecords
from kbridge.targets.qga import ChannelError, ExecResult, GuestAgent, Qmp

_T = TypeVar("_T")
BOOT_TIMEOUT_S = 120.0  # TCG on a loaded 2-core machine; a normal boot takes 2-5 s
KVM_PROBE_TIMEOUT_S = 10.0  # nested KVM that hangs is caught by this bound
KMSG_PORT = "org.kbridge.kmsg"
# Byte streams from the guest to the host, one virtio-serial port each: the kernel
# log (always streamed by the guest init) and the ports a mechanism points a guest
# program at (Target.stream_path), e.g. trace_pipe or bcc output.
PORTS = (KMSG_PORT, *STREAM_PORTS)
ROOTFS_MOUNT = "/rootfs"  # where the guest init mounts an image flavour's root filesystem


def qemu_argv(
    arch: Arch, image: Image, accel: str, rundir: Path, memory_mb: int = 1024, cpus: int = 1, cmdline_extra: str = ""
) -> list[str]:
    """The QEMU command line for IMAGE: pure, so it can be read and tested on its own."""
    cpu = "host" if accel == "kvm" else arch.tcg_cpu
    # The guest streams the kernel log to the host one record per write, ~5k records/s
    # under TCG, while a probed tight loop logs far faster: the log buffer must hold a
    # burst until the stream catches up. 32 MiB holds ~200k hit lines (6.1 sizes the
    # record descriptors from it too: ~140 MiB of the guest's memory in all).
    append = f"console={arch.console} quiet panic=-1 log_buf_len=32M {cmdline_extra}".strip()
    argv = [
        arch.qemu_binary,
        *arch.qemu_machine,
        "-cpu",
        cpu,
        "-accel",
        accel,
        "-m",
        str(memory_mb),
        "-smp",
        str(cpus),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initramfs),
        "-append",
        append,
        "-chardev",
        f"file,id=con,path={rundir / 'console.log'}",
        "-serial",
        "chardev:con",
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"socket,id=qga,path={rundir / 'qga.sock'},server=on,wait=off",
        "-device",
        "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        "-qmp",
        f"unix:{rundir / 'qmp.sock'},server=on,wait=off",
    ]
    for i, port in enumerate(PORTS):
        argv += [
            "-chardev",
            f"socket,id=port{i},path={rundir / _port_socket(port)},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=port{i},name={port}",
        ]
    rootfs = image.dir / "rootfs.ext4"
    if rootfs.is_file():
        # An image flavour's root filesystem (kbridge.images.bcc); the guest init mounts it
        # at /rootfs. snapshot=on: guest writes go to a throwaway overlay, the image stays pristine.
        argv += [
            "-drive",
            f"file={rootfs},if=none,id=rootfs,format=raw,snapshot=on",
            "-device",
            "virtio-blk-pci,drive=rootfs",
        ]
    return argv


def _port_socket(port: str) -> str:
    return f"port{PORTS.index(port)}.sock"  # short: unix socket paths max out at 107 bytes


def _spawn_prefix(keep: bool) -> list[str]:
    """What QEMU is started through: an ephemeral VM gets SIGKILL when kbridge dies.

    setpriv (util-linux) sets PR_SET_PDEATHSIG in the child without running Python
    there, which is unsafe while other threads (a module build) run.
    """
    if keep or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--pdeathsig", "KILL", "--"]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def kvm_usable(arch: Arch) -> tuple[bool, str]:
    """Whether to try KVM at all, and why not."""
    if os.environ.get("KBRIDGE_ACCEL") == "tcg":
        return False, "KBRIDGE_ACCEL=tcg"
    if arch.name != host_arch():
        return False, f"{arch.name} guest on a {host_arch()} host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    verdict = _kvm_verdict()
    if verdict is False:
        return False, "KVM did not boot a guest earlier on this host boot"
    return True, ""


def _kvm_verdict_path() -> Path:
    return cache_dir() / "kvm-verdict.json"  # a fact about the host, shared by all state dirs


def _kvm_verdict() -> bool | None:
    try:
        data = json.loads(_kvm_verdict_path().read_text())
    except (OSError, ValueError):
        return None
    return data.get("ok") if data.get("boot_id") == _boot_id() else None


def _record_kvm_verdict(ok: bool) -> None:
    _kvm_verdict_path().parent.mkdir(parents=True, exist_ok=True)
    _kvm_verdict_path().write_text(json.dumps({"boot_id": _boot_id(), "ok": ok}))


class QemuVM:
    """A running QEMU guest booted from a kbridge image: the embedded Target."""

    def __init__(self, rundir: Path, image: Image, accel: str, proc: psutil.Process, kept: bool) -> None:
        self.rundir = rundir
        self.image = image
        self.arch = image.arch
        self.krel = image.krel
        self.accel = accel
        self.flavour = image.flavour
        self.name = f"qemu:{self.arch.name}"
        self.proc = proc
        self.kept = kept
        self._agent: GuestAgent | None = None
        self._ports: dict[str, PortReader] = {}
        self._lock: int | None = None
        self._refs = 1

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def boot(cls, image: Image, keep: bool = False, memory_mb: int = 1024, cpus: int = 1) -> QemuVM:
        """Boot IMAGE: KVM when a bounded probe shows it works, else TCG."""
        rundir = (
            kept_dir(image.arch, image.suite)
            if keep
            else state_dir() / f"run-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        )
        if len(str(rundir / "qga.sock")) > 100:
            raise KbridgeError(
                f"the VM state directory {rundir} is too long for unix sockets",
                "set KBRIDGE_STATE to a shorter directory",
            )
        try_kvm, why = kvm_usable(image.arch)
        if try_kvm:
            try:
                return cls._boot(image, "kvm", rundir, keep, KVM_PROBE_TIMEOUT_S, memory_mb, cpus)
            except KbridgeError as e:  # hung (nested KVM) or QEMU refused: either way, TCG
                _record_kvm_verdict(False)
                first = e.message.strip().splitlines()[0][:160]
                progress.warn(f"KVM did not boot the guest ({first}); falling back to TCG")
        elif why:
            progress.info(f"using TCG (software emulation): {why}")
        return cls._boot(image, "tcg", rundir, keep, BOOT_TIMEOUT_S, memory_mb, cpus)

    @classmethod
    def _boot(
        cls, image: Image, accel: str, rundir: Path, keep: bool, timeout: float, memory_mb: int, cpus: int
    ) -> QemuVM:
        if shutil.which(image.arch.qemu_binary) is None:
            raise KbridgeError(
                f"{image.arch.qemu_binary} is not installed",
                f"sudo apt-get install {'qemu-system-x86' if image.arch.name == 'x86_64' else 'qemu-system-arm'}",
            )
        argv = qemu_argv(image.arch, image, accel, rundir, memory_mb, cpus)
        state_key = None
        if snapshot.supported(image, accel):
            with contextlib.suppress(Exception):  # no key, no saved state: a normal boot
                state_key = snapshot.key(argv, image, rundir)
        if state_key is not None and (state := snapshot.path_for(image, state_key)).is_file():
            try:
                return cls._launch(image, accel, rundir, keep, argv, memory_mb, cpus, timeout, state)
            except Exception:  # noqa: BLE001 - any failure to restore: boot instead, and save afresh
                snapshot.discard(image, state_key)
        vm = cls._launch(image, accel, rundir, keep, argv, memory_mb, cpus, timeout, None)
        if state_key is not None:
            with contextlib.suppress(Exception):  # not saved: the next fresh VM boots too
                snapshot.save(rundir / "qmp.sock", image, state_key)
        return vm

    @classmethod
    def _launch(
        cls,
        image: Image,
        accel: str,
        rundir: Path,
        keep: bool,
        argv: list[str],
        memory_mb: int,
        cpus: int,
        timeout: float,
        state: Path | None,
    ) -> QemuVM:
        """Start QEMU with ARGV, booting, or restoring the saved guest STATE; wait for the agent."""
        shutil.rmtree(rundir, ignore_errors=True)
        rundir.mkdir(parents=True)
        if state is not None:
            argv = [*argv, *snapshot.restore_args(state)]
        # A session of its own: Ctrl-C at the terminal reaches kbridge, which stops the
        # VM itself, instead of killing QEMU first (the guest would look crashed).
        with open(rundir / "qemu.log", "wb") as log:
            popen = subprocess.Popen(
                [*_spawn_prefix(keep), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = psutil.Process(popen.pid)
        vm = cls(rundir, image, accel, proc, keep)
        (rundir / "vm.json").write_text(
            json.dumps(
                {
                    "pid": proc.pid,
                    "create_time": proc.create_time(),
                    "accel": accel,
                    "image": str(image.dir),
                    "suite": image.suite,
                    "arch": image.arch.name,
                    "flavour": image.flavour,
                    "owner": os.getpid(),
                    "owner_create_time": psutil.Process().create_time(),
                    "krel": image.krel,
                    "memory_mb": memory_mb,
                    "cpus": cpus,
                }
            )
        )
        try:
            if state is not None:
                with progress.step(f"starting {image.arch.name} guest ({image.krel}, {accel}) from its saved state"):
                    vm._agent = vm._resume(time.monotonic() + snapshot.RESTORE_TIMEOUT_S)
            else:
                with progress.step(f"booting {image.arch.name} guest ({image.krel}, {accel})"):
                    vm._agent = vm._connect(timeout)
            if keep:
                vm._take_lock()
            if accel == "kvm":
                _record_kvm_verdict(True)
        except BaseException:
            vm.shutdown()
            raise
        return vm

    def _resume(self, deadline: float) -> GuestAgent:
        """A restored guest: run it, reconnect the agent, and set its clock (it stopped at the save)."""
        qmp = snapshot.wait_restored(self.rundir / "qmp.sock", deadline)
        qmp.close()
        while True:
            self._check_process()
            try:
                # The agent misses syncs sent while the restored guest settles: resend every 20 ms.
                agent = GuestAgent(
                    str(self.rundir / "qga.sock"), timeout=max(0.05, deadline - time.monotonic()), retry_s=0.02
                )
                break
            except ChannelError:
                if time.monotonic() > deadline:
                    raise
        agent.call("guest-set-time", time=time.time_ns())
        return agent

    @classmethod
    def attach(cls, arch: Arch, suite: str = DEFAULT_SUITE) -> QemuVM | None:
        """The kept VM for ARCH and SUITE if one is running, else None (stale state is removed)."""
        from kbridge.images.image import load

        rundir = kept_dir(arch, suite)
        if (mine := _attached.get(rundir)) is not None and mine.proc.is_running():
            mine._refs += 1  # nested use in this process shares the one agent connection
            return mine
        try:
            meta = json.loads((rundir / "vm.json").read_text())
            proc = psutil.Process(meta["pid"])
            if abs(proc.create_time() - meta["create_time"]) > 0.01 or not proc.is_running():
                raise psutil.NoSuchProcess(meta["pid"])
        except (OSError, ValueError, KeyError, psutil.Error):
            if rundir.exists():
                shutil.rmtree(rundir, ignore_errors=True)
            return None
        if meta.get("flavour") == "bcc":
            from kbridge.images import bcc

            image = bcc.load(arch, meta["suite"])
        else:
            image = load(arch, meta["suite"], verify=False)
        if image is None or (rundir / "crashed").exists():
            if image is not None:
                cls(rundir, image, meta["accel"], proc, True).shutdown()
            else:
                proc.kill()
            shutil.rmtree(rundir, ignore_errors=True)
            if image is not None:
                progress.warn(f"the kept {arch.name} VM had crashed: stopped it; a fresh one boots")
            return None
        vm = cls(rundir, image, meta["accel"], proc, True)
        vm._take_lock()
        return vm

    def _take_lock(self, timeout: float = 600.0) -> None:
        """One kbridge command at a time per VM: the agent serves a single client."""
        fd = os.open(self.rundir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = fd
                self._refs = 1
                _attached[self.rundir] = self
                return
            except BlockingIOError:
                if not told:
                    progress.info(f"waiting for another kbridge command using the {self.arch.name} VM")
                    told = True
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise KbridgeError(f"the {self.arch.name} VM stayed busy for {timeout:.0f} s") from None
                time.sleep(0.1)

    def _connect(self, timeout: float) -> GuestAgent:
        deadline = time.monotonic() + timeout
        while True:
            self._check_process()
            try:
                return GuestAgent(str(self.rundir / "qga.sock"), timeout=min(1.0, deadline - time.monotonic()))
            except ChannelError:
                if time.monotonic() > deadline:
                    raise ChannelError(
                        f"the {self.arch.name} guest did not come up within {timeout:.0f} s; "
                        f"console: {self.console_tail()!r}"
                    ) from None

    @property
    def agent(self) -> GuestAgent:
        if self._agent is None:
            self._agent = self._connect(10.0)
        return self._agent

    def shutdown(self) -> None:
        """Stop QEMU (QMP quit, then SIGKILL if it lingers) and remove its directory."""
        self._refs = 1
        self.detach()
        if self.proc.is_running():
            with contextlib.suppress(Exception):
                qmp = Qmp(str(self.rundir / "qmp.sock"), timeout=2.0)
                # Wait for quit's reply before closing, or QEMU may miss the command.
                qmp.execute("quit", timeout=5.0)
                qmp.close()
            with contextlib.suppress(psutil.Error):
                self.proc.wait(timeout=5)
            with contextlib.suppress(psutil.Error):
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> QemuVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Done with it: an ephemeral VM is shut down, a kept one is left running."""
        if not self.kept:
            self.shutdown()
        else:
            self.detach()

    def detach(self) -> None:
        """Leave a kept VM running; drop this process's connections to it (at the last user)."""
        if self._refs <= 0:
            return  # already detached: release() twice is harmless
        self._refs -= 1
        if self._refs > 0:
            return
        _attached.pop(self.rundir, None)
        if self._agent:
            with contextlib.suppress(OSError):
                self._agent.close()
            self._agent = None
        for port in list(self._ports):
            self.close_port(port)
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    # -- health ------------------------------------------------------------------

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = (self.rundir / "console.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _check_process(self) -> None:
        if self.proc.is_running() and self.proc.status() != psutil.STATUS_ZOMBIE:
            return
        console = self.console_tail(60)
        if any(m in console for m in OOPS_MARKERS):
            raise GuestCrash(f"the {self.arch.name} guest kernel panicked", console)
        qlog = (self.rundir / "qemu.log").read_text(errors="replace") if (self.rundir / "qemu.log").exists() else ""
        raise KbridgeError(f"QEMU exited unexpectedly: {qlog.strip()[-500:] or console[-500:]}")

    def check_alive(self) -> None:
        """Raise GuestCrash if the guest panicked (QEMU gone) or oopsed (console shows it)."""
        self._check_process()
        console = self.console_tail(200)
        if any(m in console for m in OOPS_MARKERS):
            self.mark_crashed()
            raise GuestCrash(f"the {self.arch.name} guest kernel oopsed", console)

    def mark_crashed(self) -> None:
        """The guest oopsed: the next command restarts a kept VM instead of reusing it."""
        with contextlib.suppress(OSError):
            (self.rundir / "crashed").touch()

    # -- Target interface --------------------------------------------------------

    def _guarded(self, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        try:
            return fn(*args, **kwargs)
        except ChannelError:
            self.check_alive()
            raise

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float | None = 120) -> ExecResult:
        return self._guarded(self.agent.run, argv, stdin, timeout)

    def spawn(self, argv: list[str], stdin: bytes | None = None) -> int:
        return self._guarded(self.agent.spawn, argv, stdin)

    def poll(self, pid: int) -> ExecResult | None:
        return self._guarded(self.agent.status, pid)

    def wait(self, pid: int, timeout: float | None = None) -> ExecResult:
        return self._guarded(self.agent.wait, pid, timeout)

    def guest_pid(self, handle: int) -> int:
        return handle  # guest-exec hands out the guest pid itself

    def bcc_python(self) -> list[str] | None:
        """python3 with bcc: the bcc flavour's root filesystem, entered with chroot."""
        if self.flavour != "bcc":
            return None
        return ["/bin/busybox", "chroot", ROOTFS_MOUNT, "/usr/bin/python3"]

    def write_file(self, path: str, data: bytes, mode: str = "w") -> None:
        """Write DATA to PATH in the guest; mode "a" appends (kprobe_events without clearing it)."""
        self._guarded(self.agent.write_file, path, data, mode)

    def read_file(self, path: str) -> bytes:
        return self._guarded(self.agent.read_file, path)

    def kmsg(self, idle: float = 0.05) -> Iterator[KmsgRecord | None]:
        """Kernel log records as they arrive; None after IDLE s without one.

        A fresh connection first delivers what the guest logged while nobody
        listened, so callers look for their own start marker.
        """
        return KmsgRecords(self._port(KMSG_PORT, idle))

    def stream(self, port: str, idle: float = 0.05) -> PortReader:
        """Lines arriving on stream PORT; None after IDLE s without one."""
        if port not in STREAM_PORTS:
            raise KbridgeError(f"unknown stream port {port!r}")
        return self._port(port, idle)

    def stream_path(self, port: str) -> str:
        return f"/dev/virtio-ports/{port}"

    def close_stream(self, port: str) -> None:
        self.close_port(port)

    def _port(self, port: str, idle: float = 0.05) -> PortReader:
        if port not in PORTS:
            raise KbridgeError(f"unknown stream port {port!r}")
        reader = self._ports.get(port)
        if reader is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.rundir / _port_socket(port)))
            reader = self._ports[port] = PortReader(sock, port, self.check_alive)
        reader.idle = idle
        return reader

    def close_port(self, port: str) -> None:
        if reader := self._ports.pop(port, None):
            reader.sock.close()


class PortReader:
    """Lines from a guest->host stream port; None after `idle` s without data.

    An iterator object rather than a generator: an exception (Ctrl-C) raised
    while it waits leaves it usable, so cleanup can keep reading.
    """

    def __init__(self, sock: socket.socket, port: str, check_alive: Callable[[], None]) -> None:
        self.sock = sock
        self.port = port
        self.idle = 0.05
        self.check_alive = check_alive
        self.buf = b""
        self.lines: list[bytes] = []

    def __iter__(self) -> PortReader:
        return self

    def __next__(self) -> str | None:
        while not self.lines:
            self.sock.settimeout(self.idle)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            if not chunk:
                self.check_alive()
                raise KbridgeError(f"the guest stream {self.port} closed")
            *self.lines, self.buf = (self.buf + chunk).split(b"\n")
        return self.lines.pop(0).decode(errors="replace")


# Kept VMs this process has attached (and locked), shared by nested users.
_attached: dict[Path, QemuVM] = {}


def kept_dir(arch: Arch, suite: str = DEFAULT_SUITE) -> Path:
    """The kept VM of ARCH and SUITE (one each, e.g. vms/x86_64, vms/arm64-sid)."""
    return state_dir() / (arch.name if suite == DEFAULT_SUITE else f"{arch.name}-{suite}")


def kept_dirs() -> list[Path]:
    """Every kept VM's directory (vm.json inside), whatever its arch and suite."""
    root = state_dir()
    return sorted(p.parent for p in root.glob("*/vm.json") if not p.parent.name.startswith("run-"))


def _owner_alive(meta: dict) -> bool:
    """Whether the kbridge process that started an ephemeral VM still runs (pid + start time)."""
    try:
        owner = psutil.Process(meta["owner"])
        return abs(owner.create_time() - meta["owner_create_time"]) < 0.01 and owner.is_running()
    except (KeyError, TypeError, psutil.Error):
        return False


def _abandoned(rundir: Path) -> bool:
    """A run directory without QEMU whose owner is gone (or that never got a QEMU, 2 min on)."""
    try:
        return not _owner_alive(json.loads((rundir / "vm.json").read_text()))
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            return time.time() - rundir.stat().st_mtime > 120
        return False


def orphans() -> list[psutil.Process]:
    """QEMU processes started by kbridge that nobody owns: not a kept VM, and their kbridge is gone.

    An ephemeral VM whose kbridge command still runs is not a stray (`vm down --all`
    must not kill a probe in progress). Run directories of dead owners are removed.
    """
    found = []
    root = state_dir()
    prefix = str(root).rstrip("/") + "/"  # with the slash: .../vms is not .../vms-other
    running: set[Path] = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if not (p.info.get("name") or "").startswith("qemu-system"):
            continue
        dirs = {Path(a.split("path=", 1)[1].split(",", 1)[0]).parent for a in cmd if "path=" in a and prefix in a}
        if not dirs:
            continue
        rundir = dirs.pop()
        running.add(rundir)
        try:
            meta = json.loads((rundir / "vm.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("pid") == p.pid and (not rundir.name.startswith("run-") or _owner_alive(meta)):
            continue  # a kept VM, or an ephemeral one whose command is still running
        found.append(p)
    for d in root.glob("run-*"):
        if d not in running and _abandoned(d):
            shutil.rmtree(d, ignore_errors=True)  # left by a kbridge that was killed
    return found
