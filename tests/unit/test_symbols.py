"""Symbol resolution rules, on excerpts of real bookworm /proc/kallsyms and kprobes/blacklist."""

from pathlib import Path

import pytest

from kbridge.arch import ARM64, X86_64
from kbridge.symbols import SymbolError, SymbolTable, parse_blacklist

DATA = Path(__file__).parent / "data"
X86 = SymbolTable.parse((DATA / "kallsyms-x86_64.txt").read_text())
A64 = SymbolTable.parse((DATA / "kallsyms-arm64.txt").read_text())
BLACKLIST = parse_blacklist((DATA / "blacklist-x86_64.txt").read_text())


def test_syscall_alias_per_arch():
    r = X86.resolve("sys_write", X86_64)
    assert (r.requested, r.symbol) == ("sys_write", "__x64_sys_write") and "syscall entry" in r.note
    assert A64.resolve("sys_write", ARM64).symbol == "__arm64_sys_write"


def test_plain_function():
    r = X86.resolve("ksys_write", X86_64)
    assert r.symbol == "ksys_write" and r.note is None and r.address == 0xFFFFFFFF81367680


def test_compiler_clone_is_chosen_and_said():
    r = X86.resolve("match_id", X86_64)
    assert r.symbol == "match_id.isra.0" and "clone" in r.note


def test_cold_fragment_refused():
    with pytest.raises(SymbolError, match="cold fragment") as e:
        X86.resolve("name_to_dev_t.cold", X86_64)
    assert "name_to_dev_t" in e.value.hint


def test_data_symbol_refused():
    with pytest.raises(SymbolError, match="'jiffies' is a data symbol"):
        X86.resolve("jiffies", X86_64)


def test_non_unique_refused():
    with pytest.raises(SymbolError, match="not unique: 22 functions"):
        X86.resolve("paravirt_read_msr", X86_64)


def test_unknown_with_near_matches():
    with pytest.raises(SymbolError, match="unknown symbol 'ksys_wrte'") as e:
        X86.resolve("ksys_wrte", X86_64)
    assert "ksys_write" in e.value.hint


def test_blacklisted():
    assert "asm_exc_divide_error" in BLACKLIST
    table = SymbolTable.parse("ffffffff81c00990 T asm_exc_divide_error\n")
    with pytest.raises(SymbolError, match="kprobe blacklist"):
        table.resolve("asm_exc_divide_error", X86_64, BLACKLIST)


def test_bad_text_never_reaches_lookup():
    with pytest.raises(Exception, match="invalid symbol"):
        X86.resolve("ksys_write; reboot", X86_64)
