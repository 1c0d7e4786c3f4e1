"""Where a guest kernel comes from: `acquire()` gives the one Target a command uses.

`--target qemu` (the default) is kbridge's embedded VM: the kept VM of the arch
and kernel if `kbridge vm up` started one, else a fresh VM shut down afterwards.
`--target vagrant[:MACHINE]` is a machine of the Vagrantfile in the current
directory (or VAGRANT_CWD), which kbridge uses as it finds it and never destroys.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kbridge import crashes, kernels, oops, progress, sanitizers
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.targets import ownership
from kbridge.targets.base import GuestCrash, Target

if TYPE_CHECKING:
    from kbridge.images.apt import Mirrors
    from kbridge.images.image import Image

FLAVOURS = (
    "default",
    "bcc",
    "bench",
)  # what acquire() may ask for; "debug" and "tree" images come with their kernel key
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
    """The image a fresh VM of ARCH, kernel SUITE (a kernel key: kbridge.kernels.resolve) and FLAVOUR
    boots (built on first use): Debian's kernel, kbridge's debug kernel, or a user's kernel tree."""
    if not kernels.is_debian(suite):
        if flavour != "default":
            raise KbridgeError(
                f"the {flavour} image is built for Debian's kernels, not {kernels.label(suite)}",
                "use the default image on this kernel (--via kmod, tracefs and bpf run there)",
            )
        if (tree := kernels.tree_of(suite)) is not None:
            from kbridge.images import kerneltree

            return kerneltree.ensure(tree, arch, mirrors)
        from kbridge.images import debugkernel

        return debugkernel.ensure(arch, mirrors)
    if flavour != "default":
        from kbridge.images import bcc

        return bcc.ensure(arch, suite, mirrors, flavour=flavour)
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
        # No arch given: the machine's. One given that is not the machine's is a mistake worth saying.
        if arch is not None and get_arch(arch if isinstance(arch, str) else arch.name) != guest.arch:
            guest.release()
            raise KbridgeError(
                f"--arch {arch if isinstance(arch, str) else arch.name} does not match "
                f"{guest.name}, which is {guest.arch.name}",
                "drop --arch with --target vagrant: the machine's arch is used",
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
        ownership.flush(guest)
        guest.release()


@contextlib.contextmanager
def watch(guest: Target) -> Iterator[Target]:
    """GUEST for a command: a crash report the kernel prints meanwhile (an oops, a panic, a BUG, a
    WARN, an RCU stall, a bug checker's report: KASAN, KFENCE, UBSAN, lockdep, sleeping in atomic
    context) fails the command, shown at once and saved to a file."""
    mark = guest.log_mark()
    try:
        yield guest
    except GuestCrash as e:
        if e.crash is not None:
            raise
        raise reported(guest, _whole_report(guest, mark) or e.text) from None
    if not guest.crashed() and (text := _whole_report(guest, mark)) is not None:
        raise reported(guest, text)


REPORT_SETTLE_S = 3.0  # a report still being printed when the command ended: wait this long for its end


def _whole_report(guest: Target, mark: int) -> str | None:
    """The first report the kernel printed after MARK, waiting (briefly) for the kernel to finish
    printing it: a checker's report can still be on its way to the console when the command returns."""
    deadline = time.monotonic() + REPORT_SETTLE_S
    text = guest.crash_since(mark)
    while text is not None and time.monotonic() < deadline:
        found = crashes.first_report(text)
        if found is None or found[1]:
            break
        time.sleep(0.3)
        again = guest.crash_since(mark)
        if again == text:  # the kernel printed nothing more: that is all of it (arm64 traces end unmarked)
            break
        text = again
    return text


def reported(guest: Target, text: str) -> GuestCrash:
    """The GuestCrash for report TEXT: attributed, saved, and the guest marked for a restart when the
    kernel cannot be trusted after it (an oops, a panic, scheduling while atomic) or a checker is off
    (lockdep after its own first report, and after KASAN's); after a WARN, or a KFENCE, UBSAN or
    sleeping-function report, the kernel went on with every checker, and the VM is kept."""
    from kbridge.crashes import Crash

    crash = Crash.of(text, guest.arch.name, guest.krel)
    crash.save()
    why = sanitizers.restarts(text)
    fatal = any(oops.is_crash(line) for line in text.splitlines()) or why is not None
    if not fatal and crash.checker is not None and _lockdep_turned_off(guest):
        # 6.1's KASAN report taints with LOCKDEP_NOW_UNRELIABLE, which turns lockdep off for the boot.
        why = "the kernel turned lockdep off with this report (debug_locks 0): a later lock-order bug would go unseen"
        fatal = True
    if fatal:
        guest.mark_crashed(crash.file)
    what = "reported" if crash.checker is None else f"reported a {crash.checker} report:"
    return GuestCrash(f"the {guest.arch.name} guest kernel {what} {crash.title}", text, crash, fatal, why)


def _lockdep_turned_off(guest: Target) -> bool:
    """Whether the guest's lockdep switched itself off (/proc/lockdep_stats: debug_locks 0). A kernel
    without lockdep has no such file: nothing was turned off."""
    try:
        stats = guest.read_file("/proc/lockdep_stats").decode(errors="replace")
    except KbridgeError:
        return False
    return re.search(r"^\s*debug_locks:\s+0\s*$", stats, re.M) is not None


def _qemu(arch: Arch, suite: str, flavour: str, keep: bool, mirrors: Mirrors | None, reuse_kept: bool = True) -> Target:
    from kbridge.targets.qemu import QemuVM

    vm = QemuVM.attach(arch, suite) if reuse_kept else None
    if vm is not None and (stale := _rebuilt_tree(vm, arch, suite, mirrors)) is not None:
        progress.warn(f"{kernels.label(suite)} was rebuilt since its kept VM booted: the VM restarts with it")
        meta = vm.describe()
        vm.shutdown()
        return QemuVM.boot(stale, keep=True, gdb=bool(meta.get("gdb")))
    if vm is not None:
        progress.info(f"using the running {arch.name} VM ({vm.krel}, {vm.accel})")
        return vm
    return QemuVM.boot(resolve_image(arch, suite, flavour, mirrors), keep=keep)


def machine_arch(target: str | TargetSpec | None, vagrantfile: Path | None = None, connect: bool = True) -> Arch | None:
    """The arch of the --target machine (None for the embedded VM, whose arch --arch chooses).

    A Vagrant machine says what it is: with CONNECT the connection made to ask it stays open
    for this process's later acquire() (one connection per command); without, the arch a
    connection found before is used (no connection at all) and a connection is made only
    when this machine was never seen, and closed at once.
    """
    where = target if isinstance(target, TargetSpec) else parse_target(target)
    if where.kind != "vagrant":
        return None
    from kbridge.targets import vagrant

    if not connect and (known := vagrant.known_arch(where.machine, vagrantfile)) is not None:
        return get_arch(known)
    guest = vagrant.connect(where.machine, vagrantfile)
    try:
        if connect:
            guest.keep_for_process()
        return guest.arch
    finally:
        guest.release()


def _rebuilt_tree(vm: Target, arch: Arch, suite: str, mirrors: Mirrors | None) -> Image | None:
    """For a kept VM of a user's kernel tree: the tree's new image when it was rebuilt since the VM
    booted (the VM runs the old kernel, and modules would build against the new one), else None."""
    if kernels.tree_of(suite) is None:
        return None
    current = resolve_image(arch, suite, "default", mirrors)
    return current if current.version != vm.image.version else None


def kept(arch: Arch, suite: str = kernels.DEFAULT) -> Target | None:
    """The kept VM of ARCH and SUITE if one runs, attached (and locked) for this process: release() it."""
    from kbridge.targets.qemu import QemuVM

    return QemuVM.attach(arch, suite)


def kept_as_is(arch: Arch, suite: str = kernels.DEFAULT) -> Target | None:
    """The kept VM of ARCH and SUITE as it is, attached: one that crashed is not restarted (its
    kernel log can still be read). None when none runs."""
    from kbridge.targets.qemu import QemuVM

    return QemuVM.attach(arch, suite, restart_crashed=False)


def running(
    arch: Arch | None, suite: str, target: str | TargetSpec | None = None, vagrantfile: Path | None = None
) -> Target:
    """A guest that is already up, attached: the kept VM of ARCH and SUITE, or the Vagrant machine TARGET.

    Nothing is booted: a one-line error says how to start one.
    """
    where = target if isinstance(target, TargetSpec) else parse_target(target)
    if where.kind == "vagrant":
        from kbridge.targets import vagrant

        guest = vagrant.connect(where.machine, vagrantfile)
        if arch is not None and arch != guest.arch:
            guest.release()
            raise KbridgeError(
                f"--arch {arch.name} does not match {guest.name}, which is {guest.arch.name}",
                "drop --arch with --target vagrant: the machine's arch is used",
            )
        return guest
    a = arch or get_arch(None)
    vm = kept(a, suite)
    if vm is None:
        raise KbridgeError(
            f"no {a.name} {kernels.label(suite)} VM is up", f"start one with {kernels.up_hint(a.name, suite)}"
        )
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
    gdb: bool = False,
) -> Target:
    """A fresh embedded VM of ARCH, kernel SUITE (a kernel key) and FLAVOUR; with KEEP, the kept VM later
    commands reuse; with GDB, QEMU's gdb stub listens on a Unix socket in its directory (kbridge gdb)."""
    from kbridge.targets.qemu import QemuVM

    image = resolve_image(arch, suite, flavour, mirrors)
    return QemuVM.boot(image, keep=keep, memory_mb=memory_mb, cpus=cpus, gdb=gdb)


def gdb_socket(target: Target) -> Path | None:
    """The Unix socket of TARGET's gdb stub (a VM booted with gdb=True), else None."""
    from kbridge.targets.qemu import QemuVM

    return target.gdb_socket if isinstance(target, QemuVM) else None


def kept_vms() -> list[Target]:
    """Every running kept VM as it is (a crashed one is not restarted), attached: release() each
    (or shutdown() it)."""
    from kbridge.targets.qemu import QemuVM, kept_dirs, kept_key

    found: list[Target] = []
    for rundir in kept_dirs():
        arch_name, key = kept_key(rundir)
        with contextlib.suppress(KbridgeError):
            if (vm := QemuVM.attach(get_arch(arch_name), key, restart_crashed=False)) is not None:
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
    if vm is not None and _rebuilt_tree(vm, arch, suite, mirrors) is None:
        img = vm.image
        vm.detach()
        return img
    if vm is not None:
        vm.detach()
    return resolve_image(arch, suite, "default", mirrors)
