"""A target plus the facts kbridge learns about its kernel (symbols, blacklist, own pids).

Symbols and the kprobe blacklist are read from the running guest once per image
and cached next to it, so later runs resolve names without asking the guest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os

from kbridge import progress
from kbridge.arch import Arch
from kbridge.images.image import Image
from kbridge.symbols import Resolution, SymbolError, SymbolTable, parse_blacklist
from kbridge.targets.base import Target

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
    def vm(self) -> Target:
        """The target (the name older callers use)."""
        return self.target

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

    def resolve(self, name: str) -> Resolution:
        """NAME as the running kernel knows it; symbols of modules loaded since are read live."""
        if ":" in name:  # MOD:SYM, a function of one loaded module (kbridge.usermod)
            from kbridge.usermod import resolve_module_symbol

            if (res := resolve_module_symbol(self.target, name, self.symbols)) is not None:
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
            self._symbols = SymbolTable.parse(self._read_kallsyms())
            self._live = True
            return self._symbols.resolve(name, self.arch, self.blacklist)

    def plumbing_pids(self) -> list[int]:
        """tgids of kbridge's guest-side helpers (agent, log streamer, SSH session): never probed."""
        own = getattr(self.target, "plumbing_pids", None)  # a target that knows its own helpers says so
        if callable(own):
            return list(own())
        pids = []
        for name in ("qga", "kmsg"):
            with contextlib.suppress(Exception):
                pids.append(int(self.target.read_file(f"/run/kbridge/{name}.pid").decode().strip()))
        return pids

    def kprobes_list(self) -> str:
        return self.target.read_file(f"{KPROBES_DEBUGFS}/list").decode(errors="replace")

    def loaded_modules(self) -> set[str]:
        text = self.target.read_file("/proc/modules").decode(errors="replace")
        return {line.split()[0] for line in text.splitlines() if line.strip()}
