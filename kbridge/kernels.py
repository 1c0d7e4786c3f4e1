"""The kernel matrix: which Debian suite gives which kernel, and what each needs to build modules.

`--kernel` takes a suite name or the kernel version that suite carries; everything
downstream (images, toolchains, the tracefs grammar) is keyed by the suite name.
"""

from __future__ import annotations

from dataclasses import dataclass

from kbridge.errors import KbridgeError

DEFAULT = "bookworm"


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
    return ", ".join(f"{s.name}|{s.version}" for s in SUITES.values())


def resolve(text: str | None) -> str:
    """The suite name for a --kernel value: a suite (bookworm) or its version (6.1); None = default."""
    if text is None:
        return DEFAULT
    key = text.strip().lower()
    if key in SUITES:
        return key
    if key in _BY_VERSION:
        return _BY_VERSION[key]
    if key in _ALIASES:
        return _ALIASES[key]
    raise KbridgeError(
        f"unknown kernel {text!r}: expected one of {choices()}",
        "e.g. --kernel 5.10 or --kernel trixie (kbridge image list shows what is built)",
    )


def get(text: str | None) -> Suite:
    """The Suite for a --kernel value (see resolve)."""
    return SUITES[resolve(text)]


def version_tuple(krel: str) -> tuple[int, int]:
    """(major, minor) of a kernel release such as '6.12.57+deb13-amd64' or '5.10.0-36-amd64'."""
    parts = krel.split("-", 1)[0].split("+", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise KbridgeError(f"cannot read a kernel version from {krel!r}") from None
