"""The kernel matrix: which Debian suite gives which kernel, and what each needs to build modules.

`--kernel` takes a suite name or the kernel version that suite carries, or `debug` (kbridge's
own sanitizer kernel, built from the default suite's kernel source); `--kernel-tree PATH` a
kernel tree the user built. Each resolves to a kernel key (`bookworm`, `debug`,
`tree:/abs/path`) that names the kept VM, the image and the module builds; the Debian suite
behind a key (suite_of) gives the guest's userspace, the compiler and the tracefs table.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from kbridge.errors import KbridgeError

DEFAULT = "bookworm"
DEBUG = "debug"  # KASAN, KFENCE, lockdep, DEBUG_ATOMIC_SLEEP, UBSAN, DWARF: kbridge.images.debugkernel
DEBUG_SUITE = "bookworm"  # whose linux-source the debug kernel is built from, and whose userspace it boots
TREE = "tree:"  # prefix of a user's kernel tree's key: tree:/abs/path


@dataclass(frozen=True)
class Suite:
    """One Debian suite in the matrix and the kernel line it carries."""

    name: str
    version: str  # the kernel line, as a user types it after --kernel
    major_minor: tuple[int, int] | None  # None: sid moves; the image's krel says which
    gcc: str  # the gcc the suite's kernel was built with (its linux-kbuild needs the same)
    host_gcc: bool  # True: the host's gcc-12 builds its modules; False: a per-suite build root
    security: bool  # the suite's kernel comes with updates from SUITE-security

    @property
    def label(self) -> str:
        return f"{self.name} ({self.version})"


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        # bullseye's kernel is built with gcc-10, but the host's gcc-12 makes modules that load
        # (measured); its current kernel is only in bullseye-security.
        Suite("bullseye", "5.10", (5, 10), "gcc-10", host_gcc=True, security=True),
        Suite("bookworm", "6.1", (6, 1), "gcc-12", host_gcc=True, security=True),
        # trixie (gcc-14) and sid: their linux-kbuild tools need a newer glibc than the host's,
        # and kbuild refuses a compiler other than the kernel's, so they get a build root.
        Suite("trixie", "6.12", (6, 12), "gcc-14", host_gcc=False, security=True),
        Suite("sid", "latest", None, "gcc", host_gcc=False, security=False),
    )
}

_BY_VERSION = {s.version: s.name for s in SUITES.values()}
# "unstable" is sid's other name in the archive.
_ALIASES = {"unstable": "sid", "stable": "bookworm"}


def choices() -> str:
    """The valid --kernel values, for help texts and error messages."""
    return ", ".join(f"{s.name}|{s.version}" for s in SUITES.values()) + f", {DEBUG}"


def resolve(text: str | None, tree: str | Path | None = None) -> str:
    """The kernel key for a --kernel value (a suite such as bookworm, its version 6.1, or debug) or a
    --kernel-tree PATH (tree:/abs/path); neither = the default suite."""
    if tree is not None:
        if text is not None:
            raise KbridgeError(
                f"--kernel {text!r} and --kernel-tree {str(tree)!r} both name the kernel", "give one of them"
            )
        return TREE + str(_tree_dir(str(tree)))
    if text is None:
        return DEFAULT
    if text.startswith(TREE):
        return TREE + str(_tree_dir(text[len(TREE) :]))
    key = text.strip().lower()
    if key in SUITES or key == DEBUG:
        return key
    if key in _BY_VERSION:
        return _BY_VERSION[key]
    if key in _ALIASES:
        return _ALIASES[key]
    raise KbridgeError(
        f"unknown kernel {text!r}: expected one of {choices()}, or --kernel-tree PATH",
        "e.g. --kernel 5.10, --kernel trixie or --kernel debug (kbridge image list shows what is built)",
    )


def _tree_dir(text: str) -> Path:
    """A --kernel-tree directory, absolute; a KbridgeError quoting it when it is no directory."""
    if not text.strip() or any(ord(c) < 32 for c in text):
        raise KbridgeError(f"invalid --kernel-tree {text!r}", "give the directory you ran make in")
    path = Path(text).expanduser()
    if not path.is_dir():
        raise KbridgeError(f"--kernel-tree {text!r} is not a directory", "give the directory you ran make in")
    return path.resolve()


def suite_of(key: str) -> str:
    """The Debian suite behind kernel KEY: its own, or bookworm for the debug kernel and a user's tree
    (their userspace, and the host's gcc builds their modules)."""
    return key if key in SUITES else DEBUG_SUITE


def is_debian(key: str) -> bool:
    """Whether KEY is a Debian suite's own kernel (as packaged), not one kbridge or the user built."""
    return key in SUITES


def tree_of(key: str) -> Path | None:
    """The kernel tree of a tree:PATH key, else None."""
    return Path(key[len(TREE) :]) if key.startswith(TREE) else None


def slug(key: str) -> str:
    """KEY as a file name (kept VMs' directories): a tree's path is hashed."""
    if (tree := tree_of(key)) is not None:
        return "tree-" + hashlib.sha256(str(tree).encode()).hexdigest()[:12]
    return key


def label(key: str) -> str:
    """KEY as messages show it."""
    tree = tree_of(key)
    return f"kernel tree {tree}" if tree is not None else key


def up_hint(arch: str, key: str) -> str:
    """The `kbridge vm up` command line that starts the kept VM of ARCH and KEY."""
    if (tree := tree_of(key)) is not None:
        return f"kbridge vm up --arch {arch} --kernel-tree {tree}"
    return f"kbridge vm up --arch {arch}" + (f" --kernel {key}" if key != DEFAULT else "")


def get(text: str | None) -> Suite:
    """The Suite behind a --kernel value or kernel key (see resolve, suite_of)."""
    if text is not None and (text.startswith(TREE) or text.strip().lower() == DEBUG):
        return SUITES[DEBUG_SUITE]
    return SUITES[resolve(text)]


def version_of(key: str) -> tuple[int, int] | None:
    """(major, minor) of kernel KEY when known before its image is built: a suite's line, the debug
    kernel's (its suite's), a tree's from its kernel.release; None for sid (it moves)."""
    if (tree := tree_of(key)) is not None:
        try:
            return version_tuple((tree / "include/config/kernel.release").read_text().strip())
        except (OSError, KbridgeError):
            return None
    return SUITES[suite_of(key)].major_minor


def version_tuple(krel: str) -> tuple[int, int]:
    """(major, minor) of a kernel release such as '6.12.57+deb13-amd64' or '5.10.0-36-amd64'."""
    parts = re.split(r"[-+]", krel, maxsplit=1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise KbridgeError(f"cannot read a kernel version from {krel!r}") from None
