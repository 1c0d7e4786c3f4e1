"""A guest kernel's BTF (what its /sys/kernel/btf/vmlinux serves), read from the kernel file kbridge boots.

No guest is needed: every Debian kernel kbridge boots (5.10 to sid, x86_64 and arm64) has
CONFIG_DEBUG_INFO_BTF=y, and the BTF sits in the file QEMU boots.

- An ELF vmlinux (the x86_64 image's `kernel`, extracted from the bzImage for the PVH boot) has
  no symbols but keeps its .BTF section.
- An arm64 Image has no sections, but the kernel serves /sys/kernel/btf/vmlinux straight from
  __start_BTF..__stop_BTF, so the blob is in it byte for byte: the one BTF header (magic 0xeB9F,
  version 1, hdr_len 24) whose type and string sections fit and look like BTF.

Both give a blob byte-identical to the guest's /sys/kernel/btf/vmlinux (checked on bookworm 6.1,
x86_64 4,360,537 bytes and arm64 4,831,195 bytes).
"""

from __future__ import annotations

import struct

from kbridge.errors import KbridgeError

BTF_MAGIC = b"\x9f\xeb\x01"  # 0xeB9F little-endian, then version 1
_HDR = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len


def _elf_section(data: bytes, want: str) -> bytes | None:
    """Section WANT of a little-endian ELF64 file, or None (not such a file, or no such section)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off, names_size = hdrs[shstrndx][4], hdrs[shstrndx][5]
    names = data[names_off : names_off + names_size]
    for name, _typ, _flags, _addr, off, size in hdrs:
        if names[name : names.index(b"\0", name)].decode(errors="replace") == want:
            return data[off : off + size]
    return None


def _btf_at(data: bytes, pos: int) -> bytes | None:
    """The BTF blob starting at POS, if the header there is plausible."""
    if pos + _HDR.size > len(data):
        return None
    _magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HDR.unpack_from(data, pos)
    if version != 1 or hdr_len != _HDR.size or type_off != 0 or str_off != type_len:
        return None
    end = pos + hdr_len + str_off + str_len
    if type_len < 1024 or str_len < 1024 or end > len(data):
        return None
    strings = data[pos + hdr_len + str_off : end]
    if strings[0] != 0 or strings[-1] != 0:  # the string section starts with "" and ends with a NUL
        return None
    return data[pos:end]


def extract(kernel: bytes) -> bytes:
    """The vmlinux BTF in a kernel file (an ELF vmlinux, or a raw arm64 Image)."""
    sec = _elf_section(kernel, ".BTF")
    if sec is not None:
        return sec
    found = []
    pos = kernel.find(BTF_MAGIC)
    while pos >= 0:
        if (blob := _btf_at(kernel, pos)) is not None:
            found.append(blob)
        pos = kernel.find(BTF_MAGIC, pos + 1)
    if len(found) != 1:
        raise KbridgeError(
            f"expected one vmlinux BTF blob in the kernel image, found {len(found)}",
            "kbridge's eBPF probe needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    return found[0]
