"""A guest kernel's crash or bug checker's report, as kbridge shows it: the kernel's own first lines,
the module and source line it blames, and the whole report saved to a file whose path is printed.

The faulting frame (RIP/pc) names FUNCTION+OFFSET [MODULE]; a checker's report (KASAN, KFENCE, UBSAN,
lockdep, sleeping in atomic context: kbridge.sanitizers) names it in its first line, or in the first
frame of a module in its stack trace. When MODULE is one kbridge built (the user's, a student's, or
kbridge's own probe), its copy with debug info maps the frame to a source file and line through
DWARF; kbridge.debuginfo indexes every module kbridge builds for that.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kbridge import debuginfo, oops, sanitizers
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
    checker: str | None = None  # KASAN, KFENCE, UBSAN, lockdep, atomic-sleep: a bug checker's report, not a crash
    # The site's offset is a return address (a stack frame's, or KASAN's _RET_IP_ of its check): the line
    # is the call's, the instruction before it. An oops's RIP/pc and KFENCE's fault address are exact.
    returns: bool = False

    @classmethod
    def of(cls, text: str, arch: str, krel: str) -> Crash:
        first = next((ln for ln in text.splitlines() if oops.is_oops(ln)), "")
        checker = sanitizers.kind(first)
        if checker is None:
            crash = cls(text, arch, krel, oops.faulting_site(text))
        else:
            site, exact = _checker_site(text, first, arch, krel)
            crash = cls(text, arch, krel, site, checker=checker, returns=not exact)
        crash.where = crash._source_line()
        # UBSAN's own FILE:LINE, when it is the module's source (the build maps it to the user's path)
        # rather than a kernel file (a header's might_sleep(), for one).
        named = sanitizers.title_location(first) if checker is not None else None
        if (
            crash.where is None
            and named is not None
            and named.file is not None
            and not named.file.startswith(("include/", "./", "kernel/", "mm/", "lib/", "arch/"))
        ):
            crash.where = f"{named.file}:{named.line}"
        return crash

    @property
    def kind(self) -> str:
        """What the kernel reported: a checker's name (KASAN, lockdep, ...) or "crash"."""
        return self.checker or "crash"

    def _source_line(self) -> str | None:
        if self.site is None or self.site.module is None:
            return None
        from kbridge import elf  # pyelftools: only for a crash in a module kbridge built

        found = debuginfo.built_module(self.site.module, self.krel, self.arch)
        if found is None:
            return None
        ko, source = found
        with contextlib.suppress(Exception):  # a report is shown even when its debug info is not readable
            offset = self.site.offset - 1 if self.returns and self.site.offset else self.site.offset
            if (line := elf.source_line(ko.read_bytes(), self.site.function, offset)) is not None:
                return f"{source.rstrip('/')}/{line[0]}:{line[1]} ({self.site.function}+{self.site.offset:#x})"
        return None

    @property
    def title(self) -> str:
        """One line: what kind of report, and the frame it blames."""
        first = next(
            (sanitizers.strip_stamp(ln).strip() for ln in self.text.splitlines() if oops.is_oops(ln)), "a kernel report"
        )
        if self.site is None:
            return first
        where = f"in module {self.site.module}" if self.site.module else "in the kernel itself"
        # A WARN's line names the site already ("WARNING: CPU: 0 PID: 150 at FILE:LINE f+0xf/0x20 [m]").
        at = "" if str(self.site) in first else f" at {self.site}"
        return f"{first}{at} ({where})" + (f", {self.where}" if self.where else "")

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
    """The first crash or checker's report in a kernel log or console TEXT (to its end), if any."""
    found = first_report(text)
    return found[0] if found else None


def first_report(text: str) -> tuple[str, bool] | None:
    """The first report in TEXT and whether it is complete (its end line is there), if any."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if oops.is_oops(ln)), None)
    if start is None:
        return None
    if sanitizers.kind(lines[start]) is not None:
        end = sanitizers.end_of(lines, start)
        complete = end is not None
    else:
        end = next((i for i in range(start, len(lines)) if oops.END.search(lines[i])), None)
        complete = end is not None or len(lines) > start + 80
    if end is None:
        end = min(len(lines) - 1, start + 80)
    return "\n".join(lines[max(0, start - 1) : end + 1]), complete


def _checker_site(text: str, first: str, arch: str, krel: str) -> tuple[oops.Site | None, bool]:
    """The frame a checker's report blames, and whether its offset is the faulting instruction's: the one
    its first line names (KASAN: its check's return address; KFENCE: the faulting access), else the first
    frame of a module kbridge built (the user's), else of any module (lockdep's "at:" lines come first)."""
    named = sanitizers.title_location(first)
    if named is not None and named.function is not None:
        site = oops.Site(named.function, named.offset or 0, named.size or 0, named.module)
        return site, sanitizers.kind(first) == "KFENCE"
    frames = sanitizers.module_frames(text)
    ours = [f for f in frames if f.module and debuginfo.built_module(f.module, krel, arch) is not None]
    for f in ours or frames:
        if f.function is not None:
            return oops.Site(f.function, f.offset or 0, f.size or 0, f.module), False
    return None, False
