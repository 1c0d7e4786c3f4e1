"""Workloads: what runs in the guest while a probe is armed."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """A guest command as an argv list (the user's --run text goes to the guest's sh -c)."""

    argv: tuple[str, ...]
    description: str

    @classmethod
    def shell(cls, command: str) -> Workload:
        return cls(("/bin/sh", "-c", command), command)


# Fixed commands that make common probe targets run (busybox applets in the guest).
_DD = ("/bin/busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=64", "count=5")
_BY_PATTERN: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"(read|write)", _DD),
    (r"open|close|(^|_)stat|getdents|execve?", ("/bin/busybox", "ls", "-l", "/etc")),
    (r"fork|clone|exit|wait", ("/bin/busybox", "sh", "-c", "/bin/true; /bin/true")),
    (r"mmap|brk|page_fault|fault", ("/bin/busybox", "ls", "/")),
)
_GENERIC = (
    "/bin/busybox",
    "sh",
    "-c",
    "ls -l / /etc >/dev/null; dd if=/dev/zero of=/dev/null bs=64 count=5 2>/dev/null",
)


def default_for(symbol: str) -> Workload:
    """A workload likely to make SYMBOL run: reads/writes, opens, process creation, or a mix."""
    for pattern, argv in _BY_PATTERN:
        if re.search(pattern, symbol):
            return Workload(argv, " ".join(argv[1:]))
    return Workload(_GENERIC, _GENERIC[-1])
