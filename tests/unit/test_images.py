"""Image-building pieces that need no download: apt sources, cpio, bzImage, QEMU argv."""

import io
import lzma
import struct
from pathlib import Path

from kbridge.arch import ARM64, X86_64
from kbridge.images.apt import host_mirrors
from kbridge.images.cpio import CpioWriter
from kbridge.images.image import Image
from kbridge.images.kernelpkgs import extract_vmlinux
from kbridge.targets.qemu.argv import qemu_argv


def test_host_mirrors_from_deb822_and_list(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://mirror.example/debian bookworm main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: https://other.example/node\nSuites: nodistro\n"
    )
    m = host_mirrors("bookworm", tmp_path)
    assert (m.main, m.security) == ("http://mirror.example/debian", "http://sec.example/debian-security")
    assert host_mirrors("trixie", tmp_path).main == "http://deb.debian.org/debian"


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, off = {}, 0
    while True:
        assert data[off : off + 6] == b"070701"
        fields = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = off + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[body_start : body_start + size]
        off = body_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_newc_layout():
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("usr/lib/kbridge/stream", b"#!/bin/sh\n", 0o755)
    w.symlink("bin/sh", "busybox")
    w.chardev("dev/console", 5, 1)
    w.close()
    entries = _read_cpio(buf.getvalue())
    assert entries["usr/lib/kbridge/stream"] == (0o100755, b"#!/bin/sh\n")
    assert entries["bin/sh"] == (0o120777, b"busybox")
    assert entries["usr"][0] == 0o40755 and entries["dev/console"][0] == 0o20600


def test_extract_vmlinux_from_a_bzimage_layout():
    elf = b"\x7fELF" + b"\0" * 60
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    image = bytes(setup) + b"\0" * 16 + payload
    assert extract_vmlinux(image) == elf


def test_qemu_argv_per_arch(tmp_path):
    for arch, console, cpu in ((X86_64, "console=ttyS0", "max"), (ARM64, "console=ttyAMA0", "cortex-a57")):
        img = Image(Path("/img"), arch, "bookworm", "6.1.0-1", "1")
        argv = qemu_argv(arch, img, "tcg", tmp_path)
        assert argv[0] == arch.qemu_binary
        assert argv[argv.index("-cpu") + 1] == cpu and argv[argv.index("-accel") + 1] == "tcg"
        assert console in argv[argv.index("-append") + 1]
        assert "-no-reboot" in argv and "panic=-1" in argv[argv.index("-append") + 1]
        assert any("name=org.qemu.guest_agent.0" in a for a in argv)
    assert qemu_argv(X86_64, img, "kvm", tmp_path)[qemu_argv(X86_64, img, "kvm", tmp_path).index("-cpu") + 1] == "host"
