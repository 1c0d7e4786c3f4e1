"""The QEMU command line of a guest: pure functions of the arch, the image and the run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

from kbridge.arch import Arch
from kbridge.guest import TRACE_BUFFER_KB
from kbridge.images.image import Image
from kbridge.targets.base import STREAM_PORTS

KMSG_PORT = "org.kbridge.kmsg"
# Byte streams from the guest to the host, one virtio-serial port each: the kernel
# log (always streamed by the guest init) and the ports a mechanism points a guest
# program at (Target.stream_path), e.g. trace_pipe or bcc output.
PORTS = (KMSG_PORT, *STREAM_PORTS)
ROOTFS_MOUNT = "/rootfs"  # where the guest init mounts an image flavour's root filesystem
GDB_SOCKET = "gdb.sock"  # QEMU's gdb stub, in the VM's directory (kbridge vm up --gdb)


def qemu_argv(
    arch: Arch,
    image: Image,
    accel: str,
    rundir: Path,
    memory_mb: int = 1024,
    cpus: int = 1,
    cmdline_extra: str = "",
    initrd: Path | None = None,
    gdb: bool = False,
) -> list[str]:
    """The QEMU command line for IMAGE (booting INITRD, by default the image's initramfs): pure, so it
    can be read and tested on its own.

    The image's own kernel arguments come too (the debug kernel's kasan_multi_shot). GDB adds QEMU's
    gdb stub on a Unix socket (never a TCP port: nothing off this host reaches the guest's memory)
    and `nokaslr`, so the addresses in vmlinux are the running kernel's (arm64 randomizes its base
    from the seed QEMU's device tree gives; x86 KASLR is the bzImage decompressor's).
    """
    cmdline_extra = " ".join(x for x in (image.cmdline, cmdline_extra, "nokaslr" if gdb else "") if x)
    cpu = "host" if accel == "kvm" else arch.tcg_cpu
    # The guest streams the kernel log to the host one record per write, ~5k records/s
    # under TCG, while a probed tight loop logs far faster: the log buffer must hold a
    # burst until the stream catches up. 32 MiB holds ~200k hit lines (6.1 sizes the
    # record descriptors from it too: ~140 MiB of the guest's memory in all).
    # The same for tracefs's ring buffer (kbridge.guest.TRACE_BUFFER_KB), set at boot so that no run
    # resizes it. quiet, then loglevel=5: the boot stays quiet, and warnings (a WARN, lockdep, KASAN)
    # reach the console with every oops and panic, where kbridge looks for them after each command.
    append = (
        f"console={arch.console} quiet loglevel=5 panic=-1 log_buf_len=32M "
        f"trace_buf_size={TRACE_BUFFER_KB}K {cmdline_extra}"
    ).strip()
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
        str(initrd or image.initramfs),
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
            f"socket,id=port{i},path={rundir / port_socket(port)},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=port{i},name={port}",
        ]
    if gdb:
        argv += [
            "-chardev",
            f"socket,id=gdb0,path={rundir / GDB_SOCKET},server=on,wait=off",
            "-gdb",
            "chardev:gdb0",
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


def port_socket(port: str) -> str:
    return f"port{PORTS.index(port)}.sock"  # short: unix socket paths max out at 107 bytes


def spawn_prefix(keep: bool) -> list[str]:
    """What QEMU is started through: an ephemeral VM gets SIGKILL when kbridge dies.

    setpriv (util-linux) sets PR_SET_PDEATHSIG in the child without running Python
    there, which is unsafe while other threads (a module build) run.
    """
    if keep or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--pdeathsig", "KILL", "--"]
