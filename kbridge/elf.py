"""Just enough ELF reading (64-bit little-endian) for kbridge: sections, DT_NEEDED, .modinfo."""

from __future__ import annotations

import struct

from kbridge.errors import KbridgeError

_SHT_DYNAMIC = 6
_DT_NEEDED = 1


def _check(data: bytes, what: str) -> None:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KbridgeError(f"{what} is not a 64-bit little-endian ELF file")


def sections(data: bytes, what: str = "file") -> dict[str, tuple[int, bytes, int]]:
    """Map section name -> (type, contents, link index)."""
    _check(data, what)
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, typ, _flags, _addr, off, size, link = struct.unpack_from("<IIQQQQI", data, shoff + i * shentsize)
        headers.append((name, typ, off, size, link))
    _, _, stroff, strsize, _ = headers[shstrndx]
    names = data[stroff : stroff + strsize]
    out = {}
    for name, typ, off, size, link in headers:
        label = names[name : names.index(b"\0", name)].decode()
        body = b"" if typ == 8 else data[off : off + size]  # SHT_NOBITS has no bytes
        out[label] = (typ, body, link)
    return out


def needed(data: bytes, what: str = "file") -> list[str]:
    """The DT_NEEDED libraries of a dynamically linked executable or library."""
    secs = sections(data, what)
    dyn = secs.get(".dynamic")
    strtab = secs.get(".dynstr")
    if not dyn or not strtab:
        return []
    strings = strtab[1]
    libs = []
    for tag, val in struct.iter_unpack("<qQ", dyn[1]):
        if tag == _DT_NEEDED:
            libs.append(strings[val : strings.index(b"\0", val)].decode())
    return libs


def interpreter(data: bytes) -> str | None:
    """The PT_INTERP path (the dynamic loader), if any."""
    _check(data, "file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        typ, _flags, off, _v, _p, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if typ == 3:
            return data[off : off + filesz].rstrip(b"\0").decode()
    return None


def modinfo(data: bytes, what: str = "module") -> dict[str, str]:
    """The key=value strings of a kernel module's .modinfo section."""
    body = sections(data, what).get(".modinfo")
    if body is None:
        raise KbridgeError(f"{what} has no .modinfo section: not a kernel module")
    info: dict[str, str] = {}
    for item in body[1].split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            info.setdefault(k, v)
    return info
