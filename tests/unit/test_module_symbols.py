"""Functions of loaded modules (MOD:SYM), resolved from /proc/kallsyms and /proc/modules captured in a
real x86_64 guest with kbchardev loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbridge.session import Session
from kbridge.symbols import SymbolError, SymbolTable, resolve_in_modules, split_module_symbol

DATA = Path(__file__).parent / "data"
KALLSYMS = (DATA / "kallsyms-modules-x86_64.txt").read_text()
LOADED = {ln.split()[0] for ln in (DATA / "proc-modules-x86_64.txt").read_text().splitlines()}


class CapturedGuest:
    """Answers read_file from files captured in a real x86_64 guest with kbchardev loaded."""

    image = None
    arch = None

    def read_file(self, path: str) -> bytes:
        name = {"/proc/kallsyms": "kallsyms-modules-x86_64.txt", "/proc/modules": "proc-modules-x86_64.txt"}[path]
        return (DATA / name).read_bytes()


def resolve(name, kernel=None):
    return resolve_in_modules(name, KALLSYMS, LOADED, kernel)


# -- module symbols (captured from a guest with kbchardev loaded) ----------------------------


def test_loaded_modules_flags_out_of_tree_ones():
    mods = Session(CapturedGuest()).modules()
    assert mods["kbchardev"] == "OE"
    assert mods["virtio_console"] == ""


def test_module_symbols_resolve():
    kernel = SymbolTable.parse((DATA / "kallsyms-modules-x86_64.txt").read_text())
    res = resolve("kbchardev_write", kernel)
    assert (res.symbol, res.address, res.note) == (
        "kbchardev:kbchardev_write",
        0xFFFFFFFFC0219000,
        "kbchardev_write is in module kbchardev",
    )
    res = resolve("kbchardev:kbchardev_reject")
    assert (res.symbol, res.address) == ("kbchardev:kbchardev_reject", 0xFFFFFFFFC021919F)
    assert resolve("ksys_write") is None


def test_a_name_in_two_modules_must_be_qualified():
    with pytest.raises(SymbolError) as e:
        resolve("cleanup_module")
    assert e.value.message == "'cleanup_module' is not unique: it is in kbchardev, virtio_console"
    assert "MODULE:FUNCTION" in e.value.hint
    res = resolve("virtio_console:cleanup_module")
    assert res.address == 0xFFFFFFFFC023385D


def test_module_symbol_errors():
    with pytest.raises(SymbolError, match="module 'mydrv' in 'mydrv:f' is not loaded"):
        resolve("mydrv:f")
    with pytest.raises(SymbolError, match="module kbchardev has no function 'kb_len'"):
        resolve("kbchardev:kb_len")  # data, not text
    for bad in ("a b:f", "m:1f", ":f"):
        with pytest.raises(SymbolError, match="expected MODULE:FUNCTION"):
            split_module_symbol(bad)
