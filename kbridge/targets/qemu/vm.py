"""The embedded QEMU target: kbridge boots its own image and owns the QEMU process.

(Over 500 lines: QemuVM implements the whole Target protocol for one QEMU process; what can
stand alone, the argv, KVM, snapshots and the agent, already does.)

A VM is a directory (sockets, console log, vm.json) plus a QEMU process recorded
by pid and start time, so a stale pid that now belongs to something else is never
mistaken for it. Ephemeral VMs die with kbridge (PR_SET_PDEATHSIG) and are shut
down on exit, Ctrl-C or error; a kept VM (`kbridge vm up`) outlives the command
and is reused by later ones. The command line is built in argv.py, the KVM check
is kvm.py's, saved guest states snapshot.py's, and the guest agent client agent.py's.
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

from kbridge import crashes, kernels, oops, procs, progress, sanitizers
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images import bpftools
from kbridge.images.image import DEFAULT_SUITE, Image
from kbridge.paths import state_dir
from kbridge.targets.base import STREAM_PORTS, ExecResult, GuestCrash, GuestIOError, KmsgRecord, KmsgRecords
from kbridge.targets.qemu import kvm
from kbridge.targets.qemu.agent import GuestAgent
from kbridge.targets.qemu.argv import (
    GDB_SOCKET,
    KMSG_PORT,
    PORTS,
    ROOTFS_MOUNT,
    port_socket,
    qemu_argv,
    spawn_prefix,
)

_T = TypeVar("_T")
BOOT_TIMEOUT_S = 120.0  # TCG on a loaded 2-core machine; a normal boot takes 2-5 s
KVM_PROBE_TIMEOUT_S = 10.0  # nested KVM that hangs is caught by this bound


class QemuVM:
    """A running QEMU guest booted from a kbridge image: the embedded Target."""

    def __init__(
        self, rundir: Path, image: Image, accel: str, proc: procs.Process, kept: bool, gdb: bool = False
    ) -> None:
        self.rundir = rundir
        self.image = image
        self.arch = image.arch
        self.krel = image.krel
        self.accel = accel
        self.flavour = image.flavour
        self.scripted_tracefs = True
        self.name = f"qemu:{self.arch.name}"
        self.proc = proc
        self.kept = kept
        # QEMU's gdb stub (kbridge vm up --gdb): a Unix socket, never a TCP port.
        self.gdb_socket: Path | None = rundir / GDB_SOCKET if gdb else None
        self._agent: GuestAgent | None = None
        self._ports: dict[str, PortReader] = {}
        self._lock: int | None = None
        self._refs = 1
        # What the console held when this process took the VM: an older report is not this command's.
        self._console_mark = self.log_mark()

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def boot(cls, image: Image, keep: bool = False, memory_mb: int = 1024, cpus: int = 1, gdb: bool = False) -> QemuVM:
        """Boot IMAGE: KVM when a bounded probe shows it works, else TCG. GDB: with QEMU's gdb stub on
        a Unix socket in the VM's directory, and the kernel told not to randomize its addresses."""
        rundir = (
            kept_dir(image.arch, image.key)
            if keep
            else state_dir() / f"run-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        )
        if len(str(rundir / "qga.sock")) > 100:
            raise KbridgeError(
                f"the VM state directory {rundir} is too long for unix sockets",
                "set KBRIDGE_STATE to a shorter directory",
            )
        try_kvm, why = kvm.kvm_usable(image.arch)
        if try_kvm:
            try:
                return cls._boot(image, "kvm", rundir, keep, KVM_PROBE_TIMEOUT_S, memory_mb, cpus, gdb)
            except KbridgeError as e:  # hung (nested KVM) or QEMU refused: either way, TCG
                kvm.record_verdict(False)
                first = e.message.strip().splitlines()[0][:160]
                progress.warn(f"KVM did not boot the guest ({first}); falling back to TCG")
        elif why:
            progress.info(f"using TCG (software emulation): {why}")
        return cls._boot(image, "tcg", rundir, keep, BOOT_TIMEOUT_S, memory_mb, cpus, gdb)

    @classmethod
    def _boot(
        cls,
        image: Image,
        accel: str,
        rundir: Path,
        keep: bool,
        timeout: float,
        memory_mb: int,
        cpus: int,
        gdb: bool = False,
    ) -> QemuVM:
        if shutil.which(image.arch.qemu_binary) is None:
            raise KbridgeError(
                f"{image.arch.qemu_binary} is not installed",
                f"sudo apt-get install {image.arch.qemu_package}",
            )
        from kbridge.targets.qemu import snapshot  # QMP (asyncio): only to boot, save or restore

        argv = qemu_argv(image.arch, image, accel, rundir, memory_mb, cpus, initrd=_initrd(image), gdb=gdb)
        state_key = None
        if snapshot.supported(image, accel):
            with contextlib.suppress(Exception):  # no key, no saved state: a normal boot
                state_key = snapshot.key(argv, image, rundir)
        if state_key is not None and (state := snapshot.path_for(image, state_key)).is_file():
            try:
                return cls._launch(image, accel, rundir, keep, argv, memory_mb, cpus, timeout, state, gdb)
            except Exception:  # noqa: BLE001 - any failure to restore: boot instead, and save afresh
                snapshot.discard(image, state_key)
        vm = cls._launch(image, accel, rundir, keep, argv, memory_mb, cpus, timeout, None, gdb)
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
        gdb: bool = False,
    ) -> QemuVM:
        """Start QEMU with ARGV, booting, or restoring the saved guest STATE; wait for the agent."""
        shutil.rmtree(rundir, ignore_errors=True)
        rundir.mkdir(parents=True)
        from kbridge.targets.qemu import snapshot

        if state is not None:
            argv = [*argv, *snapshot.restore_args(state)]
        # A session of its own: Ctrl-C at the terminal reaches kbridge, which stops the
        # VM itself, instead of killing QEMU first (the guest would look crashed).
        with open(rundir / "qemu.log", "wb") as log:
            popen = subprocess.Popen(
                [*spawn_prefix(keep), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = procs.Process(popen.pid)
        vm = cls(rundir, image, accel, proc, keep, gdb)
        (rundir / "vm.json").write_text(
            json.dumps(
                {
                    "pid": proc.pid,
                    "create_time": proc.start,
                    "accel": accel,
                    "image": str(image.dir),
                    "suite": image.suite,
                    "kernel": image.key,
                    "arch": image.arch.name,
                    "flavour": image.flavour,
                    "owner": os.getpid(),
                    "owner_create_time": procs.start_time(os.getpid()),
                    "krel": image.krel,
                    "version": image.version,
                    "memory_mb": memory_mb,
                    "cpus": cpus,
                    "gdb": gdb,
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
                kvm.record_verdict(True)
        except BaseException:
            vm.shutdown()
            raise
        return vm

    def _resume(self, deadline: float) -> GuestAgent:
        """A restored guest: run it, reconnect the agent, and set its clock (it stopped at the save)."""
        from kbridge.targets.qemu import snapshot

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
            except GuestIOError:
                if time.monotonic() > deadline:
                    raise
        agent.call("guest-set-time", time=time.time_ns())
        return agent

    @classmethod
    def attach(cls, arch: Arch, suite: str = DEFAULT_SUITE, restart_crashed: bool = True) -> QemuVM | None:
        """The kept VM for ARCH and SUITE if one is running, else None (stale state is removed).

        A kept VM that crashed is restarted: stopped, a fresh one booted from the same image in its
        place, and the user told which of their modules it held and no longer does. With
        RESTART_CRASHED False it is attached as it is (`vm status`).
        """
        rundir = kept_dir(arch, suite)
        if (mine := _attached.get(rundir)) is not None and mine.proc.is_running():
            mine._refs += 1  # nested use in this process shares the one agent connection
            return mine
        try:
            meta = json.loads((rundir / "vm.json").read_text())
            if not procs.alive(meta["pid"], meta["create_time"]):
                raise ProcessLookupError(meta["pid"])
            proc = procs.Process(meta["pid"], meta["create_time"])
        except (OSError, ValueError, KeyError, TypeError):
            if rundir.exists():
                shutil.rmtree(rundir, ignore_errors=True)
            return None
        image = _image_of(meta, arch)
        if image is None or ((rundir / "crashed").exists() and restart_crashed):
            lost = _user_modules(rundir)
            report = (rundir / "crashed").read_text(errors="replace").strip() if image is not None else ""
            if image is not None:
                cls(rundir, image, meta["accel"], proc, True).shutdown()
            else:
                proc.kill()
            shutil.rmtree(rundir, ignore_errors=True)
            if image is None:
                return None
            said = f" (its report: {report})" if report else ""
            what = "had crashed"
            if (title := _report_title(report)) and (checker := sanitizers.kind(title)) is not None:
                what = f"reported {checker}, whose kernel is not reused"  # lockdep is off after its first report
            gone = (
                f"; {', '.join(sorted(lost))} {'was' if len(lost) == 1 else 'were'} loaded in it and "
                f"{'is' if len(lost) == 1 else 'are'} not now (kbridge module load DIR)"
                if lost
                else ""
            )
            progress.warn(f"the kept {arch.name} VM {what}{said}: it was stopped and restarts now{gone}")
            return cls.boot(
                image,
                keep=True,
                memory_mb=meta.get("memory_mb", 1024),
                cpus=meta.get("cpus", 1),
                gdb=bool(meta.get("gdb")),
            )
        vm = cls(rundir, image, meta["accel"], proc, True, bool(meta.get("gdb")))
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
            except GuestIOError:
                if time.monotonic() > deadline:
                    raise GuestIOError(
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
                from kbridge.targets.qemu.qmp import Qmp  # asyncio: only to stop or save a VM

                qmp = Qmp(str(self.rundir / "qmp.sock"), timeout=2.0)
                # Wait for quit's reply before closing, or QEMU may miss the command.
                qmp.execute("quit", timeout=5.0)
                qmp.close()
            if not self.proc.wait(timeout=5):
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

    def _console(self, since: int = 0) -> str:
        try:
            with open(self.rundir / "console.log", "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_mark(self) -> int:
        """The console log's size now: the kernel prints its reports there (loglevel=5: warnings too)."""
        try:
            return (self.rundir / "console.log").stat().st_size
        except OSError:
            return 0

    def crash_since(self, mark: int) -> str | None:
        return crashes.find(self._console(mark))

    def _check_process(self) -> None:
        if self.proc.is_running() and not self.proc.is_zombie():
            return
        console = self._console(self._console_mark)
        if (report := crashes.find(console)) is not None:
            raise GuestCrash(f"the {self.arch.name} guest kernel panicked", report)
        qlog = (self.rundir / "qemu.log").read_text(errors="replace") if (self.rundir / "qemu.log").exists() else ""
        raise KbridgeError(f"QEMU exited unexpectedly: {qlog.strip()[-500:] or console[-500:]}")

    def check_alive(self) -> None:
        """Raise GuestCrash if the guest panicked (QEMU gone) or oopsed since this process attached."""
        self._check_process()
        report = crashes.find(self._console(self._console_mark))
        if report is not None and any(oops.is_crash(ln) for ln in report.splitlines()):
            self.mark_crashed()
            raise GuestCrash(f"the {self.arch.name} guest kernel oopsed", report)

    def crashed(self) -> bool:
        return (self.rundir / "crashed").exists()

    def mark_crashed(self, report: Path | None = None) -> None:
        """The guest oopsed: the next command restarts a kept VM instead of reusing it (REPORT: the saved crash)."""
        with contextlib.suppress(OSError):
            (self.rundir / "crashed").write_text(str(report or ""))

    def host_state(self) -> Path:
        return self.rundir

    # -- Target interface --------------------------------------------------------

    def _guarded(self, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        try:
            return fn(*args, **kwargs)
        except GuestIOError:
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

    def plumbing_pids(self) -> list[int]:
        """The guest agent and the kernel-log streamer (kbridge/guest/init writes their pids): never probed."""
        found = self._guarded(self.agent.read_small, ["/run/kbridge/qga.pid", "/run/kbridge/kmsg.pid"])
        return [int(text) for text in found.values() if text is not None and text.strip().isdigit()]

    def describe(self) -> dict:
        """What `kbridge vm status` shows of it."""
        return {
            "target": self.name,
            "arch": self.arch.name,
            "suite": self.image.key,
            "kernel": self.krel,
            "accel": self.accel,
            "flavour": self.flavour,
            "pid": self.proc.pid,
            "dir": str(self.rundir),
            "image": str(self.image.dir),
            "crashed": self.crashed(),
            "crash_report": (self.rundir / "crashed").read_text().strip() or None if self.crashed() else None,
            "user_modules": _user_modules(self.rundir),
            "gdb": str(self.gdb_socket) if self.gdb_socket else None,
        }

    def bcc_python(self) -> list[str] | None:
        """python3 with bcc: the bcc flavour's root filesystem, entered with chroot."""
        if self.flavour not in ("bcc", "bench"):
            return None
        return ["/bin/busybox", "chroot", ROOTFS_MOUNT, "/usr/bin/python3"]

    def bcc_missing(self) -> KbridgeError:
        arch = self.arch.name
        return KbridgeError(
            f"{self.name} has no bcc: it was booted from the default image, which has no python3-bpfcc",
            f"stop it (kbridge vm down --arch {arch}) so --via bpf boots the bcc image, or keep one with "
            f"kbridge bpf up --arch {arch}",
        )

    def write_file(self, path: str, data: bytes, mode: str = "w") -> None:
        """Write DATA to PATH in the guest; mode "a" appends (kprobe_events without clearing it)."""
        self._guarded(self.agent.write_file, path, data, mode)

    def read_file(self, path: str) -> bytes:
        return self._guarded(self.agent.read_file, path)

    def read_chunks(self, path: str, size: int = 1 << 20) -> Iterator[bytes]:
        chunks = self.agent.read_chunks(path, size)
        while True:
            chunk = self._guarded(next, chunks, None)
            if chunk is None:
                return
            yield chunk

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
            sock.connect(str(self.rundir / port_socket(port)))
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


def _initrd(image: Image) -> Path:
    """The image's initramfs followed by kbridge's eBPF loader and probe (kbridge.images.bpftools), when
    this host can build them; the image's own otherwise (--via bpf then pushes them, or says what is missing)."""
    try:
        return bpftools.boot_initrd(image)
    except Exception as e:  # noqa: BLE001 - never a reason not to boot
        progress.warn(f"the guest boots without kbridge's eBPF probe: {e}")
        return image.initramfs


def _user_modules(rundir: Path) -> list[str]:
    """The user's modules kbridge loaded into the VM of RUNDIR (kbridge.modules keeps the list)."""
    try:
        return list(json.loads((rundir / "modules.json").read_text()))
    except (OSError, ValueError, TypeError):
        return []


# Kept VMs this process has attached (and locked), shared by nested users.
_attached: dict[Path, QemuVM] = {}


def kept_dir(arch: Arch, suite: str = DEFAULT_SUITE) -> Path:
    """The kept VM of ARCH and kernel SUITE (a kernel key; one each, e.g. vms/x86_64, vms/arm64-sid,
    vms/x86_64-debug, vms/x86_64-tree-HASH for a user's kernel tree)."""
    return state_dir() / (arch.name if suite == DEFAULT_SUITE else f"{arch.name}-{kernels.slug(suite)}")


def kept_key(rundir: Path) -> tuple[str, str]:
    """(arch name, kernel key) of the kept VM in RUNDIR, from its vm.json (a tree's key is not in
    the directory's name), else from the name."""
    arch_name, _, slug = rundir.name.partition("-")
    try:
        meta = json.loads((rundir / "vm.json").read_text())
        return str(meta.get("arch", arch_name)), str(meta.get("kernel") or meta.get("suite") or DEFAULT_SUITE)
    except (OSError, ValueError, AttributeError):
        return arch_name, slug or DEFAULT_SUITE


def kept_dirs() -> list[Path]:
    """Every kept VM's directory (vm.json inside), whatever its arch and suite."""
    root = state_dir()
    return sorted(p.parent for p in root.glob("*/vm.json") if not p.parent.name.startswith("run-"))


def _image_of(meta: dict, arch: Arch) -> Image | None:
    """The image a kept VM was booted from, as its vm.json records it: found by that path, so a
    command run with another cache directory attaches the VM too (and does not stop it)."""
    d = Path(meta.get("image", ""))
    if meta.get("version") and (d / "kernel").is_file() and (d / "headers").is_dir():
        key = meta.get("kernel") or meta["suite"]
        return Image(
            d,
            arch,
            meta["suite"],
            meta["krel"],
            meta["version"],
            meta.get("flavour", "default"),
            kernel_id="" if key == meta["suite"] else key,
            cmdline=_manifest_cmdline(d),
        )
    if meta.get("flavour") in ("bcc", "bench"):
        from kbridge.images import bcc

        return bcc.load(arch, meta["suite"], meta["flavour"])
    from kbridge.images.image import load

    return load(arch, meta["suite"], verify=False)


def _manifest_cmdline(d: Path) -> str:
    try:
        return str(json.loads((d / "manifest.json").read_text()).get("cmdline", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _report_title(report: str) -> str:
    """The first line of the saved report at path REPORT (its title), or ""."""
    try:
        with open(report, errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""
