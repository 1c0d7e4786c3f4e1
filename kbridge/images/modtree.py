"""A kernel's module tree as its packages ship it: where it is, a module's bytes, a dependency closure.

Used to choose the drivers a guest loads at boot (the image's initramfs, a bcc root
filesystem, a box) and to write the list its init loads them from.
"""

from __future__ import annotations

import lzma
from pathlib import Path

from kbridge.errors import KbridgeError
from kbridge.images.kernelpkgs import unzstd

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def modroot(kpkg: Path, krel: str) -> Path:
    """lib/modules/KREL, or usr/lib/modules/KREL where the packages are /usr-merged (trixie on)."""
    for cand in (kpkg / "lib/modules" / krel, kpkg / "usr/lib/modules" / krel):
        if (cand / "modules.builtin").is_file():
            return cand
    raise KbridgeError(f"kernel {krel}: no modules.builtin in its packages (unexpected layout)")


def module_bytes(path: Path) -> bytes:
    """A module file's ELF bytes; trixie and sid ship them xz-compressed (CONFIG_MODULE_COMPRESS_XZ)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return unzstd(data)
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    return data


def _module_name(path: Path) -> str:
    name = path.name
    for suf in MODULE_SUFFIXES[::-1]:
        if name.endswith(suf):
            return name[: -len(suf)].replace("-", "_")
    return name


def module_closure(modroot: Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[Path]:
    """The .ko files for NAMES and their dependencies, dependencies first; built-ins skipped.

    Names in OPTIONAL are left out when the kernel has no such module (e.g.
    crc32c_generic, gone in 6.14 when ext4 moved to the crc32c library).
    """
    builtin = {Path(line).stem.replace("-", "_") for line in (modroot / "modules.builtin").read_text().split()}
    by_name = {_module_name(p): p for suf in MODULE_SUFFIXES for p in modroot.rglob("*" + suf)}
    order: list[Path] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in builtin or by_name.get(name) in order:
            return
        if name not in by_name:
            raise KbridgeError(f"guest kernel has no module {name!r} (and it is not built in)")
        from kbridge import elf  # pyelftools: only to build an image

        deps = elf.modinfo(module_bytes(by_name[name]), name).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep)
        order.append(by_name[name])

    for n in names:
        if n in optional and n.replace("-", "_") not in by_name:
            continue
        visit(n)
    return order


def module_list(paths: list[str]) -> bytes:
    """/etc/kbridge/modules: one module path a line, and an empty file for none (a kernel with its
    virtio drivers built in): the init's `while read` would read one empty line and insmod ''."""
    return "".join(f"{p}\n" for p in paths).encode()
