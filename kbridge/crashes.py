"""A guest kernel's crash, as kbridge shows it: the kernel's own first lines, the module and source line
it blames, and the whole report saved to a file whose path is printed.

The faulting frame (RIP/pc) names FUNCTION+OFFSET [MODULE]. When MODULE is one kbridge built (the
user's, a student's, or kbridge's own probe), its copy with debug info maps the frame to a source
file and line through DWARF; kbridge.debuginfo indexes every module kbridge builds for that.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kbridge import oops
from kbridge.paths import cache_dir

HEAD_FRAMES = 6  # of the call trace, shown at once; the whole report is in the file


@dataclass
class Crash:
    """What the guest kernel reported, and what kbridge makes of it."""

    text: str  # the report, from its first line to the kernel's end-of-trace line
    arch: str
    krel: str
    site: oops.Site | None = None
    where: str | None = None  # "kbring.c:42 (kbring_ioctl+0x3f)" when the module was built by kbridge
    file: Path | None = None  # where the whole report was saved

    @classmethod
    def of(cls, text: str, arch: str, krel: str) -> Crash:
        crash = cls(text, arch, krel, oops.faulting_site(text))
        crash.where = crash._source_line()
        return crash

    def _source_line(self) -> str | None:
        if self.site is None or self.site.module is None:
            return None
        from kbridge import debuginfo, elf  # pyelftools: only for a crash in a module kbridge built

        found = debuginfo.built_module(self.site.module, self.krel, self.arch)
        if found is None:
            return None
        ko, source = found
        with contextlib.suppress(Exception):  # a report is shown even when its debug info is not readable
            if (line := elf.source_line(ko.read_bytes(), self.site.function, self.site.offset)) is not None:
                return f"{source.rstrip('/')}/{line[0]}:{line[1]} ({self.site.function}+{self.site.offset:#x})"
        return None

    @property
    def title(self) -> str:
        """One line: what kind of report, and the frame it blames."""
        first = next((ln.strip() for ln in self.text.splitlines() if oops.is_oops(ln)), "a kernel report")
        if self.site is None:
            return first
        where = f"in module {self.site.module}" if self.site.module else "in the kernel itself"
        return f"{first} at {self.site} ({where})" + (f", {self.where}" if self.where else "")

    def head(self, frames: int = HEAD_FRAMES) -> str:
        """The report's head: the BUG/WARN line, RIP/pc with [module], the first FRAMES of the call trace."""
        return "\n".join(oops.head(self.text, frames))

    def save(self) -> Path:
        """The whole report in the crash directory; its path."""
        if self.file is None:
            d = cache_dir() / "crashes"
            d.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.file = d / f"{stamp}-{self.arch}-{os.getpid()}.txt"
            self.file.write_text(f"{self.title}\nkernel {self.krel} ({self.arch})\n\n{self.text}\n")
        return self.file


def find(text: str) -> str | None:
    """The first crash report in a kernel log or console TEXT (to its end-of-trace line), if any."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if oops.is_oops(ln)), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(lines)) if oops.END.search(lines[i])), min(len(lines) - 1, start + 80))
    return "\n".join(lines[max(0, start - 1) : end + 1])
