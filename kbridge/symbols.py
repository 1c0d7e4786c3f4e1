"""Symbol resolution on the target kernel, before anything is built or loaded.

The table is the guest's /proc/kallsyms and the kprobe blacklist its debugfs
kprobes/blacklist, both read from a running guest once per image and cached
with it (kbridge.session), so later runs resolve names before any boot.
"""

from __future__ import annotations

import bisect
import difflib
import re
from dataclasses import dataclass, replace

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.spec import validate_symbol

TEXT_TYPES = frozenset("TtWw")
_CLONE = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_]*)\.(isra|constprop|part|lto_priv|localalias)(\.\d+)*$")


class SymbolError(KbridgeError):
    """A symbol that cannot be probed, with the reason and near matches."""


@dataclass(frozen=True)
class Resolution:
    """What a requested name resolved to on the target, and why."""

    requested: str
    symbol: str
    address: int  # from the symbol table, possibly of an earlier boot (KASLR): for ordering, not use
    note: str | None = None  # said to the user when symbol != requested
    size: int | None = None  # bytes up to the next symbol (kallsyms has no sizes): offsets must stay below


class SymbolTable:
    """Name -> [(address, type)] for one kernel."""

    def __init__(self, entries: dict[str, list[tuple[int, str]]]) -> None:
        self.entries = entries
        self._starts: list[int] | None = None

    def size(self, address: int) -> int | None:
        """Bytes from ADDRESS to the next symbol's address: the function's extent, padding included."""
        if self._starts is None:
            self._starts = sorted({a for e in self.entries.values() for a, _ in e})
        i = bisect.bisect_right(self._starts, address)
        return self._starts[i] - address if i < len(self._starts) else None

    @classmethod
    def parse(cls, text: str) -> SymbolTable:
        """Parse System.map or /proc/kallsyms text ('ADDR TYPE NAME [\\t[MODULE]]')."""
        entries: dict[str, list[tuple[int, str]]] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3:
                entries.setdefault(parts[2], []).append((int(parts[0], 16), parts[1]))
        return cls(entries)

    def text(self, name: str) -> list[int]:
        return [a for a, t in self.entries.get(name, ()) if t in TEXT_TYPES]

    def near(self, name: str, n: int = 5) -> list[str]:
        """Text symbols spelled like NAME, best first."""
        base = name.split(".", 1)[0]
        words = [w for w in base.split("_") if len(w) >= 3]
        pool = [
            s
            for s, e in self.entries.items()
            if any(t in TEXT_TYPES for _, t in e) and (not words or any(w in s for w in words))
        ]
        return difflib.get_close_matches(base, pool, n=n, cutoff=0.6)

    def resolve(self, name: str, arch: Arch, blacklist: frozenset[str] = frozenset()) -> Resolution:
        """Resolve NAME as a user means it: syscall aliases, compiler clones; refuse what can't be probed."""
        validate_symbol(name)
        if name.endswith(".cold") or ".cold." in name:
            base = name.split(".cold", 1)[0]
            raise SymbolError(
                f"{name!r} is a .cold fragment (the out-of-line unlikely path of {base}), not a function entry",
                f"probe the function itself: {base}",
            )
        requested = name
        addrs = self.text(name)
        note = None
        if not addrs and self.entries.get(name):
            kind = self.entries[name][0][1]
            raise SymbolError(
                f"{name!r} is a data symbol (kallsyms type {kind!r}), not a function",
                "kprobes attach to code; pick the function that uses it",
            )
        if not addrs:
            name, addrs, note = self._alias(name, arch)
        if len(addrs) > 1:
            listing = ", ".join(f"{a:#x}" for a in addrs[:4])
            raise SymbolError(
                f"{name!r} is not unique: {len(addrs)} functions have that name ({listing})",
                "register_kprobe would pick one silently; probe a uniquely named caller instead",
            )
        if name in blacklist:
            raise SymbolError(
                f"{name!r} is on the kprobe blacklist (debugfs kprobes/blacklist): "
                "probing it could recurse into the kprobe machinery itself",
                "pick its caller or a function it calls",
            )
        return Resolution(requested, name, addrs[0], note, self.size(addrs[0]))

    def _alias(self, name: str, arch: Arch) -> tuple[str, list[int], str]:
        m = re.fullmatch(r"(?:sys|SyS|__sys)_(\w+)", name)
        if m:
            entry = arch.syscall_entry(m.group(1))  # __x64_sys_write, __arm64_sys_write, sys_write (arm)
            if entry != name and (addrs := self.text(entry)):
                return entry, addrs, f"{name} -> {entry} (the syscall entry on {arch.name})"
        clones = sorted(s for s in self.entries if s.startswith(name + ".") and _CLONE.match(s) and self.text(s))
        if len(clones) == 1:
            return clones[0], self.text(clones[0]), f"{name} -> {clones[0]} (the compiler's optimised clone)"
        if clones:
            raise SymbolError(
                f"{name!r} exists only as compiler clones: {', '.join(clones)}", "name the clone you want"
            )
        near = self.near(name)
        hint = f"did you mean: {', '.join(near)}?" if near else "check the spelling against /proc/kallsyms"
        raise SymbolError(f"unknown symbol {name!r} in this kernel", hint)


def parse_blacklist(text: str) -> frozenset[str]:
    """Names from debugfs kprobes/blacklist ('0xSTART-0xEND\\tNAME [MODULE]')."""
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names.add(parts[1])
    return frozenset(names)


# -- functions of loaded modules ------------------------------------------------------

MODULE_NAME_LEN = 56  # include/linux/module.h: MODULE_NAME_LEN (64 - sizeof(unsigned long))
_MODNAME = re.compile(r"[A-Za-z0-9_-]+")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def valid_module_name(name: str) -> str:
    """NAME in the kernel's spelling (- becomes _) if it can be a module name; a KbridgeError otherwise."""
    if not isinstance(name, str) or not _MODNAME.fullmatch(name) or len(name) >= MODULE_NAME_LEN:
        raise KbridgeError(
            f"invalid module name {name!r}", "a module name is like mydrv (kbridge vm exec -- lsmod lists them)"
        )
    return name.replace("-", "_")


def module_symbols(kallsyms: str) -> dict[str, list[tuple[int, str, str]]]:
    """Symbols of loaded modules in /proc/kallsyms text: name -> [(address, type, module)]."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    for line in kallsyms.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3].startswith("[") and parts[3].endswith("]"):
            out.setdefault(parts[2], []).append((int(parts[0], 16), parts[1], parts[3][1:-1]))
    return out


def split_module_symbol(name: str) -> tuple[str | None, str]:
    """'mod:sym' -> ('mod', 'sym'); 'sym' -> (None, 'sym'); validated as tracefs's MOD:SYM."""
    mod, sep, sym = name.rpartition(":")
    if not sep:
        return None, name
    if not _MODNAME.fullmatch(mod) or len(mod) >= MODULE_NAME_LEN or not _IDENT.fullmatch(sym.split(".", 1)[0]):
        raise SymbolError(f"invalid symbol {name!r}: expected MODULE:FUNCTION", "e.g. mydrv:mydrv_write")
    return mod.replace("-", "_"), sym


def resolve_in_modules(
    name: str, kallsyms: str, loaded: set[str], kernel: SymbolTable | None = None
) -> Resolution | None:
    """NAME ('sym' or 'mod:sym') among the functions of the modules in KALLSYMS (read now), as MOD:SYM.

    None when a plain name is in no loaded module. A name in several modules (or in a
    module and the kernel, per KERNEL) must be qualified as MOD:SYM, as tracefs accepts
    it and kallsyms_lookup_name resolves it (6.1).
    """
    mod, sym = split_module_symbol(name)
    table = module_symbols(kallsyms)
    found = [(a, m) for a, t, m in table.get(sym, ()) if t in TEXT_TYPES]
    if not found and (clones := sorted(s for s in table if s.startswith(sym + ".") and _CLONE.match(s))):
        if len(clones) > 1:
            raise SymbolError(f"{sym!r} exists only as compiler clones: {', '.join(clones)}", "name the clone you want")
        resolved = resolve_in_modules(f"{mod}:{clones[0]}" if mod else clones[0], kallsyms, loaded, kernel)
        if resolved is not None:
            return replace(
                resolved, requested=name, note=f"{name} -> {resolved.symbol} (the compiler's clone, in a module)"
            )
    if mod is not None:
        mine = [a for a, m in found if m == mod]
        if not mine:
            if mod not in loaded:
                raise SymbolError(f"module {mod!r} in {name!r} is not loaded", "kbridge module load DIR first")
            raise SymbolError(
                f"module {mod} has no function {sym!r}",
                f"its symbols: kbridge vm exec -- grep '\\[{mod}\\]' /proc/kallsyms",
            )
        if len(mine) > 1:
            raise SymbolError(f"{name!r} is not unique: {len(mine)} functions of {mod} have that name")
        return Resolution(name, name, mine[0], None)
    if not found:
        return None
    # KERNEL may have been read while modules were loaded: only other addresses are the kernel's.
    in_kernel = bool(kernel and set(kernel.text(sym)) - {a for a, _ in found})
    if len(found) > 1 or in_kernel:
        where = sorted({m for _, m in found}) + (["the kernel"] if in_kernel else [])
        raise SymbolError(
            f"{sym!r} is not unique: it is in {', '.join(where)}",
            f"name it as MODULE:FUNCTION, e.g. {found[0][1]}:{sym}",
        )
    # Qualified, so later steps (kprobe symbol_name, tracefs, ftrace's function list) find this one.
    return Resolution(name, f"{found[0][1]}:{sym}", found[0][0], f"{sym} is in module {found[0][1]}")
