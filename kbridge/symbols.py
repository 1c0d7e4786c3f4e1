"""Symbol resolution on the target kernel, before anything is built or loaded.

The table is the guest's /proc/kallsyms and the kprobe blacklist its debugfs
kprobes/blacklist, both read from a running guest once per image and cached
with it (kbridge.session), so later runs resolve names before any boot.
"""

from __future__ import annotations

import bisect
import difflib
import re
from dataclasses import dataclass

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.spec import validate_symbol

_TEXT_TYPES = frozenset("TtWw")
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
        return [a for a, t in self.entries.get(name, ()) if t in _TEXT_TYPES]

    def near(self, name: str, n: int = 5) -> list[str]:
        """Text symbols spelled like NAME, best first."""
        base = name.split(".", 1)[0]
        words = [w for w in base.split("_") if len(w) >= 3]
        pool = [
            s
            for s, e in self.entries.items()
            if any(t in _TEXT_TYPES for _, t in e) and (not words or any(w in s for w in words))
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
            entry = f"{arch.syscall_prefix}{m.group(1)}"
            if addrs := self.text(entry):
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
