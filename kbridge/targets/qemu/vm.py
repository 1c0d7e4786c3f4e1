"""The embedded QEMU target: kbridge boots its own image and owns the QEMU process.

QemuVM is the Target: how a guest is booted (KVM or TCG, fresh or from a saved state), how a
kept one is attached, shared and locked, and the protocol over the guest agent and stream
ports. Ephemeral VMs die with kbridge (PR_SET_PDEATHSIG) and are shut down on exit, Ctrl-C or
error; a kept VM (`kbridge vm up`) outlives the command and is reused by later ones. The
QEMU process itself (start, console log, stop) is process.py's, the run directory and its
vm.json rundirs.py's, the stream ports' reader ports.py's, the command line argv.py's, the
KVM check kvm.py's, saved guest states snapshot.py's, and the guest agent client agent.py's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from kbridge import crashes, oops, procs, progress
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images import bpftools
from kbridge.images.image import DEFAULT_SUITE, Image
from kbridge.targets.base import STREAM_PORTS, ExecResult, GuestCrash, GuestIOError, KmsgRecord, KmsgRecords
from kbridge.targets.qemu import kvm, process, rundirs
from kbridge.targets.qemu.agent import GuestAgent
from kbridge.targets.qemu.argv import GDB_SOCKET, KMSG_PORT, PORTS, ROOTFS_MOUNT, port_socket, qemu_argv
from kbridge.targets.qemu.ports import PortReader
from kbridge.targets.qemu.process import QemuProcess

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
        # The process and its console; its mark is where this process took the VM: an older
        # report is not this command's.
        self.qemu = QemuProcess(rundir, self.arch, proc)
        self.kept = kept
        # QEMU's gdb stub (kbridge vm up --gdb): a Unix socket, never a TCP port.
        self.gdb_socket: Path | None = rundir / GDB_SOCKET if gdb else None
        self._agent: GuestAgent | None = None
        self._ports: dict[str, PortReader] = {}
        self._lock: int | None = None
        self._refs = 1

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def boot(cls, image: Image, keep: bool = False, memory_mb: int = 1024, cpus: int = 1, gdb: bool = False) -> QemuVM:
        """Boot IMAGE: KVM when a bounded probe shows it works, else TCG. GDB: with QEMU's gdb stub on
        a Unix socket in the VM's directory, and the kernel told not to randomize its addresses."""
        rundir = rundirs.for_boot(image, keep)
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
        from kbridge.targets.qemu import snapshot

        proc = process.spawn(argv, rundir, keep, state)
        vm = cls(rundir, image, accel, proc, keep, gdb)
        rundirs.write_record(rundir, proc, image, accel, memory_mb, cpus, gdb)
        try:
            if state is not None:
                with progress.step(f"starting {image.arch.name} guest ({image.krel}, {accel}) from its saved state"):
                    vm._agent = vm.qemu.resume(time.monotonic() + snapshot.RESTORE_TIMEOUT_S)
            else:
                with progress.step(f"booting {image.arch.name} guest ({image.krel}, {accel})"):
                    vm._agent = vm.qemu.connect(timeout)
            if keep:
                vm._take_lock()
            if accel == "kvm":
                kvm.record_verdict(True)
        except BaseException:
            vm.shutdown()
            raise
        return vm

    @classmethod
    def attach(cls, arch: Arch, suite: str = DEFAULT_SUITE, restart_crashed: bool = True) -> QemuVM | None:
        """The kept VM for ARCH and SUITE if one is running, else None (stale state is removed).

        A kept VM that crashed is restarted: stopped, a fresh one booted from the same image in its
        place, and the user told which of their modules it held and no longer does. With
        RESTART_CRASHED False it is attached as it is (`vm status`).
        """
        rundir = rundirs.kept_dir(arch, suite)
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
        image = rundirs.image_of(meta, arch)
        if image is None or ((rundir / "crashed").exists() and restart_crashed):
            if image is None:
                proc.kill()
                shutil.rmtree(rundir, ignore_errors=True)
                return None
            notice = rundirs.restart_notice(rundir, arch)
            cls(rundir, image, meta["accel"], proc, True).shutdown()
            shutil.rmtree(rundir, ignore_errors=True)
            progress.warn(notice)
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

    @property
    def agent(self) -> GuestAgent:
        if self._agent is None:
            self._agent = self.qemu.connect(10.0)
        return self._agent

    def shutdown(self) -> None:
        """Stop QEMU (QMP quit, then SIGKILL if it lingers) and remove its directory."""
        self._refs = 1
        self.detach()
        self.qemu.stop()

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
        return self.qemu.console_tail(lines)

    def log_mark(self) -> int:
        """The console log's size now: the kernel prints its reports there (loglevel=5: warnings too)."""
        return self.qemu.log_mark()

    def crash_since(self, mark: int) -> str | None:
        return crashes.find(self.qemu.console(mark))

    def check_alive(self) -> None:
        """Raise GuestCrash if the guest panicked (QEMU gone) or oopsed since this process attached."""
        self.qemu.check()
        report = crashes.find(self.qemu.console(self.qemu.console_mark))
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
            "user_modules": rundirs.user_modules(self.rundir),
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


def _initrd(image: Image) -> Path:
    """The image's initramfs followed by kbridge's eBPF loader and probe (kbridge.images.bpftools), when
    this host can build them; the image's own otherwise (--via bpf then pushes them, or says what is missing)."""
    try:
        return bpftools.boot_initrd(image)
    except Exception as e:  # noqa: BLE001 - never a reason not to boot
        progress.warn(f"the guest boots without kbridge's eBPF probe: {e}")
        return image.initramfs


# Kept VMs this process has attached (and locked), shared by nested users.
_attached: dict[Path, QemuVM] = {}
