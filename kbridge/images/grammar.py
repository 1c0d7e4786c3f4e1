"""Which kprobe_events grammar a cached image's kernel speaks: read from its .config and release.

An image not built yet (or a kernel without a .config) falls back to its suite's row
of the grammar table (kbridge.kprobe_events).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from kbridge import kernels
from kbridge.arch import Arch
from kbridge.images.image import Image, load
from kbridge.images.kconfig import parse_config

if TYPE_CHECKING:
    from kbridge.kprobe_events import Grammar


def grammar(img: Image | None, arch: Arch, suite: str) -> Grammar:
    """The kprobe_events grammar of IMG's kernel (its .config and release), else SUITE's from the table."""
    from kbridge.kprobe_events import grammar_for  # the grammar tables: only commands that parse event lines

    if img is not None and (cfg := img.config).is_file():
        return grammar_for(suite, arch, _config_file(str(cfg), cfg.stat().st_mtime_ns), img.krel)
    return grammar_for(suite, arch)


def grammar_of(arch: Arch, suite: str) -> Grammar:
    """The grammar of the kernel kbridge boots on ARCH for SUITE (a kernel key): its built image's,
    else the table's (the debug kernel's and a tree's: bookworm's until built or laid out)."""
    if not kernels.is_debian(suite):
        from kbridge.images import debugkernel, kerneltree

        tree = kernels.tree_of(suite)
        img = debugkernel.load(arch) if tree is None else kerneltree.load_dir(kerneltree.image_dir(tree, arch), arch)
        return grammar(img, arch, suite)
    return grammar(load(arch, suite, verify=False), arch, suite)


@functools.lru_cache(maxsize=16)  # read for every line checked: parsed once per file version
def _config_file(path: str, mtime_ns: int) -> dict[str, str]:
    return parse_config(Path(path).read_text())
