"""A target plus the facts kbridge learns about its kernel: symbols, the kprobe blacklist, the
modules loaded, the ftrace sites, kprobes/list.

Symbols and the kprobe blacklist are read from the running guest once per image
and cached next to it, so later runs resolve names without asking the guest;
functions of modules loaded since are read live.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
from typing import TYPE_CHECKING

from kbridge import progress
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images.image import Image
from kbridge.symbols import Resolution, SymbolError, SymbolTable, parse_blacklist, resolve_in_modules
from kbridge.targets.base import Target

if TYPE_CHECKING:
    from kbridge.kprobe_events import Grammar

KPROBES_DEBUGFS = "/sys/kernel/debug/kprobes"


def cached_symbols(img: Image) -> SymbolTable | None:
    """The image's kernel symbols as read from a guest earlier, if any."""
    path = img.state / "kallsyms.gz"
    if not path.is_file():
        return None
    try:
        return SymbolTable.parse(gzip.decompress(path.read_bytes()).decode())
    except (OSError, EOFError, ValueError):
        return None


def cached_blacklist(img: Image) -> frozenset[str] | None:
    """The image's kprobe blacklist as read from a guest earlier, if any."""
    path = img.state / "blacklist"
    return parse_blacklist(path.read_text()) if path.is_file() else None


def cached_resolution(img: Image, name: str, arch: Arch) -> Resolution | None:
    """NAME resolved against the image's cached table and blacklist (None: none cached yet).

    Parsing the whole table takes 0.5-1 s; a name resolved before is read back from
    a small file, valid while the cached table and blacklist are unchanged.
    Raises SymbolError like SymbolTable.resolve (refusals are not remembered).
    """
    try:
        stamp = ":".join(str((img.state / f).stat().st_mtime_ns) for f in ("kallsyms.gz", "blacklist"))
    except OSError:
        return None
    memo = img.state / "resolved.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get("stamp") != stamp:
        known = {"stamp": stamp}
    key = f"{arch.name}:{name}"
    if isinstance(hit := known.get(key), dict):
        with contextlib.suppress(TypeError):
            return Resolution(**hit)
    table, blacklist = cached_symbols(img), cached_blacklist(img)
    if table is None or blacklist is None:
        return None
    res = table.resolve(name, arch, blacklist)
    known[key] = dataclasses.asdict(res)
    with contextlib.suppress(OSError):
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    return res


class Session:
    """One target kernel: resolve symbols, know kbridge's own guest processes."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.image = target.image
        self.arch = target.arch
        self._symbols: SymbolTable | None = None
        self._live = False  # _symbols came from this guest's /proc/kallsyms, not the cache
        self._blacklist: frozenset[str] | None = None

    @property
    def symbols(self) -> SymbolTable:
        if self._symbols is None:
            self._symbols = cached_symbols(self.image)
        if self._symbols is None:
            with progress.step("reading the guest kernel's symbol table (once per image)"):
                text = self._read_kallsyms()
                self.image.state.mkdir(parents=True, exist_ok=True)
                tmp = self.image.state / "kallsyms.gz.tmp"
                # Only the kernel's own symbols are cached: modules come and go.
                base = "\n".join(ln for ln in text.splitlines() if not ln.endswith("]"))
                tmp.write_bytes(gzip.compress(base.encode(), 1))
                tmp.rename(self.image.state / "kallsyms.gz")
            self._symbols = SymbolTable.parse(text)
            self._live = True
        return self._symbols

    def _read_kallsyms(self) -> str:
        return self.target.read_file("/proc/kallsyms").decode(errors="replace")

    @property
    def blacklist(self) -> frozenset[str]:
        if self._blacklist is None:
            self._blacklist = cached_blacklist(self.image)
        if self._blacklist is None:
            text = self.target.read_file(f"{KPROBES_DEBUGFS}/blacklist").decode()
            self.image.state.mkdir(parents=True, exist_ok=True)
            (self.image.state / "blacklist").write_text(text)
            self._blacklist = parse_blacklist(text)
        return self._blacklist

    @property
    def grammar(self) -> Grammar:
        """The kprobe_events grammar of this guest's kernel (its image's .config)."""
        from kbridge.images.grammar import grammar

        return grammar(self.image, self.arch, self.image.suite)

    def resolve(self, name: str) -> Resolution:
        """NAME as the running kernel knows it; symbols of modules loaded since are read live."""
        if ":" in name:  # MOD:SYM, a function of one loaded module
            if (res := self.resolve_in_modules(name)) is not None:
                return res
        elif self._symbols is None:  # a name resolved before needs no table parse
            with contextlib.suppress(SymbolError):
                if (res := cached_resolution(self.image, name, self.arch)) is not None:
                    return res
        try:
            return self.symbols.resolve(name, self.arch, self.blacklist)
        except SymbolError:
            if self._live:
                raise
            # Not the image's: a function of a module loaded since (named MOD:SYM from here on).
            if (res := self.resolve_in_modules(name)) is not None:
                return res
            self._symbols = SymbolTable.parse(self._read_kallsyms())
            self._live = True
            return self._symbols.resolve(name, self.arch, self.blacklist)

    def resolve_in_modules(self, name: str) -> Resolution | None:
        """NAME among the functions of the modules loaded now (MOD:SYM), or None if none has it."""
        kallsyms = self.target.read_file("/proc/kallsyms").decode(errors="replace")
        return resolve_in_modules(name, kallsyms, set(self.modules()), self.symbols)

    def kprobes_list(self) -> str:
        return self.target.read_file(f"{KPROBES_DEBUGFS}/list").decode(errors="replace")

    def modules(self) -> dict[str, str]:
        """Loaded module name -> its /proc/modules taint flags ("OE" for an unsigned out-of-tree one)."""
        text = self.target.read_file("/proc/modules").decode(errors="replace")
        mods = {}
        for line in text.splitlines():
            if parts := line.split():
                mods[parts[0]] = line.rsplit("(", 1)[1].rstrip(")") if line.rstrip().endswith(")") else ""
        return mods

    def loaded_modules(self) -> set[str]:
        return set(self.modules())

    def has_btf(self, module: str) -> bool:
        """Whether loaded MODULE came with BTF (the kernel lists it in /sys/kernel/btf, 5.11+)."""
        return self.target.run(["/bin/busybox", "test", "-e", f"/sys/kernel/btf/{module}"], timeout=30).ok

    def is_ftraceable(self, symbol: str) -> bool:
        """Whether SYMBOL is in tracefs available_filter_functions (grep in the guest: the file is large)."""
        mod, _, func = symbol.rpartition(":")  # a module's functions are listed as "FUNC [MOD]"
        for path in (
            "/sys/kernel/tracing/available_filter_functions",
            "/sys/kernel/debug/tracing/available_filter_functions",
        ):
            res = self.target.run(
                ["/bin/busybox", "grep", "-qxF", f"{func} [{mod}]" if mod else symbol, path], timeout=60
            )
            if res.exitcode in (0, 1):
                return res.exitcode == 0
        raise KbridgeError("could not read available_filter_functions in the guest (tracefs not mounted?)")
