"""A target plus the facts kbridge learns about its kernel (symbols, blacklist, own pids).

Symbols and the kprobe blacklist are read from the running guest once per image
and cached next to it, so later runs resolve names without asking the guest.
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Iterator

from kbridge import progress
from kbridge.arch import Arch, get_arch
from kbridge.images import image as images
from kbridge.images.apt import Mirrors
from kbridge.symbols import Resolution, SymbolTable, parse_blacklist
from kbridge.targets.qemu import QemuVM

KPROBES_DEBUGFS = "/sys/kernel/debug/kprobes"


def cached_symbols(img: images.Image) -> SymbolTable | None:
    path = img.state / "kallsyms.gz"
    if not path.is_file():
        return None
    try:
        return SymbolTable.parse(gzip.decompress(path.read_bytes()).decode())
    except (OSError, EOFError, ValueError):
        return None


def cached_blacklist(img: images.Image) -> frozenset[str] | None:
    path = img.state / "blacklist"
    return parse_blacklist(path.read_text()) if path.is_file() else None


class Session:
    """One target kernel: resolve symbols, know kbridge's own guest processes."""

    def __init__(self, vm: QemuVM) -> None:
        self.vm = vm
        self.image = vm.image
        self.arch = vm.arch
        self._symbols: SymbolTable | None = None
        self._blacklist: frozenset[str] | None = None

    @property
    def symbols(self) -> SymbolTable:
        if self._symbols is None:
            self._symbols = cached_symbols(self.image)
        if self._symbols is None:
            with progress.step("reading the guest kernel's symbol table (once per image)"):
                text = self.vm.read_file("/proc/kallsyms")
                self.image.state.mkdir(parents=True, exist_ok=True)
                tmp = self.image.state / "kallsyms.gz.tmp"
                tmp.write_bytes(gzip.compress(text, 1))
                tmp.rename(self.image.state / "kallsyms.gz")
            self._symbols = SymbolTable.parse(text.decode())
        return self._symbols

    @property
    def blacklist(self) -> frozenset[str]:
        if self._blacklist is None:
            self._blacklist = cached_blacklist(self.image)
        if self._blacklist is None:
            text = self.vm.read_file(f"{KPROBES_DEBUGFS}/blacklist").decode()
            self.image.state.mkdir(parents=True, exist_ok=True)
            (self.image.state / "blacklist").write_text(text)
            self._blacklist = parse_blacklist(text)
        return self._blacklist

    def resolve(self, name: str) -> Resolution:
        return self.symbols.resolve(name, self.arch, self.blacklist)

    def plumbing_pids(self) -> list[int]:
        """tgids of kbridge's guest-side helpers (agent, log streamer): never probed."""
        pids = []
        for name in ("qga", "kmsg"):
            with contextlib.suppress(Exception):
                pids.append(int(self.vm.read_file(f"/run/kbridge/{name}.pid").decode().strip()))
        return pids

    def kprobes_list(self) -> str:
        return self.vm.read_file(f"{KPROBES_DEBUGFS}/list").decode(errors="replace")

    def loaded_modules(self) -> set[str]:
        text = self.vm.read_file("/proc/modules").decode(errors="replace")
        return {line.split()[0] for line in text.splitlines() if line.strip()}


@contextlib.contextmanager
def open_target(arch: Arch | str | None = None, suite: str = images.DEFAULT_SUITE,
                mirrors: Mirrors | None = None, bcc: bool = False) -> Iterator[QemuVM]:
    """The kept VM for ARCH if one runs, else a fresh VM that is shut down on exit.

    BCC: a fresh VM boots the bcc image flavour (eBPF needs its root filesystem).
    """
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    vm = QemuVM.attach(arch)
    if vm is None:
        if bcc:
            from kbridge.images import bcc as bcc_images

            vm = QemuVM.boot(bcc_images.ensure(arch, suite, mirrors))
        else:
            vm = QemuVM.boot(images.ensure(arch, suite, mirrors))
    else:
        progress.info(f"using the running {arch.name} VM ({vm.krel}, {vm.accel})")
    with vm:
        yield vm


def image_for(arch: Arch | str | None, suite: str = images.DEFAULT_SUITE,
              mirrors: Mirrors | None = None) -> images.Image:
    """The image a command on ARCH will use: the kept VM's, else the cached default."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    return images.ensure(arch, suite, mirrors)

