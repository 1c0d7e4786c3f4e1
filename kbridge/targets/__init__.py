"""Where a guest kernel comes from: `acquire()` gives the one Target a command uses.

`--target qemu` (the default) is kbridge's embedded VM: the kept VM of the arch
and kernel if `kbridge vm up` started one, else a fresh VM shut down afterwards.
`--target vagrant[:MACHINE]` is a machine of the Vagrantfile in the current
directory (or VAGRANT_CWD), which kbridge uses as it finds it and never destroys.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kbridge import kernels, oops, progress
from kbridge.arch import Arch, get_arch
from kbridge.crashes import Crash
from kbridge.errors import KbridgeError
from kbridge.images.apt import Mirrors
from kbridge.targets import ownership
from kbridge.targets.base import GuestCrash, Target

if TYPE_CHECKING:
    from kbridge.images.image import Image

FLAVOURS = ("default", "bcc")
_MACHINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class TargetSpec:
    """A parsed --target value: 'qemu', 'vagrant' or 'vagrant:MACHINE'."""

    kind: str
    machine: str | None = None

    def __str__(self) -> str:
        return self.kind if self.machine is None else f"{self.kind}:{self.machine}"


def parse_target(text: str | None) -> TargetSpec:
    """Validate a --target value; a bad one is quoted back with the valid forms."""
    if text is None or text.strip() in ("", "qemu"):
        return TargetSpec("qemu")
    kind, sep, machine = text.strip().partition(":")
    if kind == "vagrant" and (not sep or _MACHINE.fullmatch(machine)):
        return TargetSpec("vagrant", machine or None)
    raise KbridgeError(
        f"invalid --target {text!r}: expected qemu, vagrant or vagrant:MACHINE",
        "MACHINE is a name from `vagrant status`, e.g. --target vagrant:kbridge-arm64",
    )


def resolve_image(arch: Arch, suite: str, flavour: str = "default", mirrors: Mirrors | None = None) -> Image:
    """The image a fresh VM of ARCH, SUITE and FLAVOUR boots (built on first use)."""
    if flavour == "bcc":
        from kbridge.images import bcc

        return bcc.ensure(arch, suite, mirrors)
    from kbridge.images import image

    return image.ensure(arch, suite, mirrors)


@contextlib.contextmanager
def acquire(
    arch: Arch | str | None = None,
    flavour: str = "default",
    keep: bool = False,
    kernel: str | None = None,
    target: str | TargetSpec | None = None,
    mirrors: Mirrors | None = None,
    vagrantfile: Path | None = None,
    watched: bool = True,
    reuse_kept: bool = True,
) -> Iterator[Target]:
    """The guest a command runs in, released (stopped if ephemeral) when the block ends.

    qemu: the kept VM of ARCH and KERNEL if one runs, else a fresh one of FLAVOUR
    ("bcc" boots the image with bcc for eBPF), kept running afterwards if KEEP.
    vagrant: the named (or primary) machine, which must be up.
    WATCHED: a crash report the kernel prints during the block fails it (kbridge.targets.watch);
    the labs watch each check themselves. REUSE_KEPT False: a fresh VM even when a kept one runs
    (one of several VMs grading at once).
    """
    if flavour not in FLAVOURS:
        raise KbridgeError(f"unknown image flavour {flavour!r}", f"use one of: {', '.join(FLAVOURS)}")
    spec = target if isinstance(target, TargetSpec) else parse_target(target)
    if spec.kind == "vagrant":
        from kbridge.targets import vagrant

        guest: Target = vagrant.connect(spec.machine, vagrantfile)
        if arch is not None and get_arch(arch if isinstance(arch, str) else arch.name) != guest.arch:
            guest.release()
            raise KbridgeError(
                f"--arch {arch if isinstance(arch, str) else arch.name} does not match "
                f"{guest.name}, which is {guest.arch.name}",
                "drop --arch with --target vagrant",
            )
    else:
        guest = _qemu(
            get_arch(arch) if not isinstance(arch, Arch) else arch,
            kernels.resolve(kernel),
            flavour,
            keep,
            mirrors,
            reuse_kept,
        )
    try:
        if guest.kept and (done := ownership.reclaim(guest)):
            progress.warn(f"{guest.name}: cleaned up after a kbridge that was killed: {', '.join(done)}")
        if watched:
            with watch(guest):
                yield guest
        else:
            yield guest
    finally:
        guest.release()


@contextlib.contextmanager
def watch(guest: Target) -> Iterator[Target]:
    """GUEST for a command: a crash report the kernel prints meanwhile (an oops, a panic, a BUG, a
    WARN, an RCU stall, a sanitizer's report) fails the command, shown at once and saved to a file."""
    mark = guest.log_mark()
    try:
        yield guest
    except GuestCrash as e:
        if e.crash is not None:
            raise
        raise reported(guest, guest.crash_since(mark) or e.text) from None
    if not guest.crashed() and (text := guest.crash_since(mark)) is not None:
        raise reported(guest, text)


def reported(guest: Target, text: str) -> GuestCrash:
    """The GuestCrash for report TEXT: attributed, saved, and the guest marked for a restart when the
    kernel cannot be trusted after it (a WARN alone leaves it running)."""
    crash = Crash.of(text, guest.arch.name, guest.krel)
    crash.save()
    fatal = any(oops.is_crash(line) for line in text.splitlines())
    if fatal:
        guest.mark_crashed(crash.file)
    return GuestCrash(f"the {guest.arch.name} guest kernel reported {crash.title}", text, crash, fatal)


def _qemu(arch: Arch, suite: str, flavour: str, keep: bool, mirrors: Mirrors | None, reuse_kept: bool = True) -> Target:
    from kbridge.targets.qemu import QemuVM

    vm = QemuVM.attach(arch, suite) if reuse_kept else None
    if vm is not None:
        progress.info(f"using the running {arch.name} VM ({vm.krel}, {vm.accel})")
        return vm
    return QemuVM.boot(resolve_image(arch, suite, flavour, mirrors), keep=keep)


def kept(arch: Arch, suite: str = kernels.DEFAULT) -> Target | None:
    """The kept VM of ARCH and SUITE if one runs, attached (and locked) for this process: release() it."""
    from kbridge.targets.qemu import QemuVM

    return QemuVM.attach(arch, suite)


def kept_as_is(arch: Arch, suite: str = kernels.DEFAULT) -> Target | None:
    """The kept VM of ARCH and SUITE as it is, attached: one that crashed is not restarted (its
    kernel log can still be read). None when none runs."""
    from kbridge.targets.qemu import QemuVM

    return QemuVM.attach(arch, suite, restart_crashed=False)


def running(arch: Arch | None, suite: str, target: str | TargetSpec | None = None) -> Target:
    """A guest that is already up, attached: the kept VM of ARCH and SUITE, or the Vagrant machine TARGET.

    Nothing is booted: a one-line error says how to start one.
    """
    where = target if isinstance(target, TargetSpec) else parse_target(target)
    if where.kind == "vagrant":
        from kbridge.targets import vagrant

        return vagrant.connect(where.machine)
    a = arch or get_arch(None)
    vm = kept(a, suite)
    if vm is None:
        up_hint = f"kbridge vm up --arch {a.name}" + (f" --kernel {suite}" if suite != kernels.DEFAULT else "")
        raise KbridgeError(f"no {a.name} {suite} VM is up", f"start one with {up_hint}")
    return vm


def kept_running(arch: Arch, suite: str = kernels.DEFAULT) -> bool:
    """Whether a kept VM of ARCH and SUITE is up (without attaching to it)."""
    from kbridge.targets.qemu import kept_dir

    return (kept_dir(arch, suite) / "vm.json").exists()


def boot(
    arch: Arch,
    suite: str = kernels.DEFAULT,
    flavour: str = "default",
    keep: bool = False,
    memory_mb: int = 1024,
    cpus: int = 1,
    mirrors: Mirrors | None = None,
) -> Target:
    """A fresh embedded VM of ARCH, SUITE and FLAVOUR; with KEEP, the kept VM later commands reuse."""
    from kbridge.targets.qemu import QemuVM

    return QemuVM.boot(resolve_image(arch, suite, flavour, mirrors), keep=keep, memory_mb=memory_mb, cpus=cpus)


def kept_vms() -> list[Target]:
    """Every running kept VM as it is (a crashed one is not restarted), attached: release() each
    (or shutdown() it)."""
    from kbridge.targets.qemu import QemuVM, kept_dirs

    found: list[Target] = []
    for rundir in kept_dirs():
        arch_name, _, suite = rundir.name.partition("-")
        with contextlib.suppress(KbridgeError):
            if (vm := QemuVM.attach(get_arch(arch_name), suite or kernels.DEFAULT, restart_crashed=False)) is not None:
                found.append(vm)
    return found


def shutdown(target: Target) -> None:
    """Stop a kept VM for good (a Vagrant machine is never stopped: it is released)."""
    from kbridge.targets.qemu import QemuVM

    if isinstance(target, QemuVM):
        target.shutdown()
    else:
        target.release()


def strays() -> list[int]:
    """Pids of QEMU processes kbridge started that nobody owns (their kbridge was killed)."""
    from kbridge.targets.qemu import orphans

    return [p.pid for p in orphans()]


def kill_strays() -> int:
    """SIGKILL every stray QEMU; how many."""
    import psutil

    from kbridge.targets.qemu import orphans

    n = 0
    for p in orphans():
        with contextlib.suppress(psutil.Error):
            p.kill()
            n += 1
    return n


def kvm_check(arch: Arch) -> tuple[bool, str]:
    """Whether kbridge will try KVM for ARCH guests on this host, and why not."""
    from kbridge.targets.qemu import kvm_usable

    return kvm_usable(arch)


def vagrant_readiness() -> list[dict]:
    """What a Vagrant target needs on this host (vagrant, its libvirt plugin, libvirtd), as doctor rows."""
    from kbridge.targets import vagrant

    return vagrant.readiness()


def kept_image(arch: Arch, suite: str, mirrors: Mirrors | None = None) -> Image:
    """The image a command on ARCH and SUITE will use: the kept VM's, else the default flavour's.

    Read without locking the kept VM, so work that needs only the image (symbols,
    a module build) can start before the guest is attached or booted.
    """
    from kbridge.targets.qemu import QemuVM

    vm = QemuVM.attach(arch, suite)
    if vm is not None:
        img = vm.image
        vm.detach()
        return img
    return resolve_image(arch, suite, "default", mirrors)
