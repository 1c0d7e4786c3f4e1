"""A student's kernel module: built by kbridge's one module builder (kbridge.kbuild) against the guest
image's headers, loaded and unloaded in the guest (owned while loaded), and an oops in it mapped back to
the student's source line through the module's DWARF line table."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from kbridge import elf, kbuild, oops
from kbridge.guest import GUEST_DIR as GUEST_SOURCES
from kbridge.images.image import Image
from kbridge.labs.grading import StudentCrash
from kbridge.labs.guest import GUEST_DIR, LogWatch, guest_run
from kbridge.session import Session
from kbridge.targets import ownership
from kbridge.targets.base import GuestIOError, Target


@dataclass
class StudentModule:
    """A module that built: kbuild's result and the student file it came from."""

    name: str
    built: kbuild.Built
    student_file: str  # the student's path, as shown in diagnostics

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.built.warnings


def build_student_module(name: str, source: str, directory: Path, image: Image) -> StudentModule:
    """Build NAME.c (the student's SOURCE, from DIRECTORY) with kbridge's own Kbuild (the student's is
    never used); a compile error raises BuildError with gcc's diagnostics at the student's file and line."""
    files = {f"{name}.c": source.encode(), "Kbuild": f"obj-m := {name}.o\n".encode()}
    built = kbuild.pick(kbuild.build(files, image, str(directory), untrusted=True), str(directory), name)
    return StudentModule(name, built, str(directory / f"{name}.c"))


def imports(mod: StudentModule) -> set[str]:
    """The kernel symbols the module calls (its undefined symbols, resolved at insmod)."""
    return elf.undefined_symbols(mod.built.debug_ko.read_bytes())


def oops_site(text: str, mod: StudentModule) -> str | None:
    """'file:line (function+0xOFF)' of the first frame in the student's module in an oops, if any."""
    for site in oops.module_sites(text, mod.name):
        ko = mod.built.debug_ko.read_bytes()
        # A frame below the faulting one is a return address: its call is the instruction before it.
        where = elf.source_line(ko, site.function, site.offset) or elf.source_line(ko, site.function, site.offset - 1)
        if where is not None:
            return f"{mod.student_file}:{where[1]} ({site.function}+{site.offset:#x})"
        return f"{site.function}+{site.offset:#x} in {mod.name} (no line information)"
    return None


def crash_detail(crash: StudentCrash, mod: StudentModule | None) -> str:
    """The oops text for a failed check, led by the student's source line when it can be found."""
    site = oops_site(crash.text, mod) if mod is not None else None
    head = f"{crash.message}, at {site}" if site else crash.message
    return f"{head}:\n{crash.text}"


class LoadedModule:
    """insmod/rmmod of a built module in the guest, owned while loaded (a killed check leaves nothing)."""

    def __init__(self, target: Target, mod: StudentModule, log: LogWatch) -> None:
        self.target = target
        self.mod = mod
        self.log = log
        self.guest_ko = f"{GUEST_DIR}/{mod.name}.ko"
        self.loaded = False
        self.record: ownership.Record | None = None
        target.write_file(self.guest_ko, mod.built.ko.read_bytes())

    def insmod(self, *params: str) -> tuple[bool, int | None, list[str]]:
        """Load it with kbridge's loader (finit_module once: busybox insmod would run a failing init
        twice); (loaded, the errno it failed with, the module's and the loader's kernel log lines)."""
        self.unload_leftover()
        if self.record is None:
            self.record = ownership.claim(self.target, "module", self.mod.name)
        loader = kbuild.build_guest_program(GUEST_SOURCES / "insmod.c", self.target.image)
        guest_loader = f"{GUEST_DIR}/kbridge-insmod"
        self.target.write_file(guest_loader, loader.read_bytes())
        self.target.run(["/bin/busybox", "chmod", "0700", guest_loader], timeout=30)
        mark = len(self.log.lines)
        args = [guest_loader, self.guest_ko] + ([" ".join(params)] if params else [])
        code, _ = guest_run(self.target, args, self.log, what=f"insmod {self.mod.name}.ko")
        self.loaded = code == 0
        if not self.loaded:
            self._release()
        said = [t for t in self.log.lines[mark:] if t.startswith(f"{self.mod.name}: ") or "Unknown symbol" in t]
        err = code if 0 < code < 250 else None
        return self.loaded, err, said

    def rmmod(self) -> tuple[bool, str]:
        # rmmod takes well under a second; a hang here is a broken exit function (or a probe
        # left behind whose handlers were freed): do not wait the workload's minute for it.
        code, out = guest_run(self.target, ["/sbin/rmmod", self.mod.name], self.log, timeout=10)
        if code == 0:
            self.loaded = False
            self._release()
        return code == 0, out.strip()

    def _release(self) -> None:
        if self.record is not None:
            ownership.release(self.target, self.record)
            self.record = None

    def unload_leftover(self) -> None:
        """A module of the same name left by an interrupted check would make insmod fail."""
        if self.mod.name in loaded_modules(self.target):
            self.target.run(["/sbin/rmmod", self.mod.name], timeout=60)

    def cleanup(self) -> None:
        """Unload if still loaded (best effort: after an oops the module may be stuck)."""
        with contextlib.suppress(Exception):
            if self.loaded:
                self.rmmod()
        with contextlib.suppress(Exception):
            self.target.run(["/bin/busybox", "rm", "-f", self.guest_ko], timeout=10)


def loaded_modules(target: Target) -> set[str]:
    return Session(target).loaded_modules()


def kprobes_list(target: Target) -> list[tuple[str, str, str, str]]:
    """debugfs kprobes/list as (address, kind k|r|p, symbol+off, flags) tuples."""
    out = []
    for line in target.read_file("/sys/kernel/debug/kprobes/list").decode(errors="replace").splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3:
            out.append((parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else ""))
    return out


def read_state(target: Target, path: str) -> dict[str, str]:
    """A 'key value' per line debugfs file the lab module provides ({} if it is missing)."""
    try:
        text = target.read_file(path).decode(errors="replace")
    except GuestIOError:
        return {}
    return dict(line.split(None, 1) for line in text.splitlines() if len(line.split(None, 1)) == 2)


def int_state(target: Target, path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """KEYS of a state file as integers (0 for a missing or unreadable one: the check then fails)."""
    raw = read_state(target, path)
    out = {}
    for k in keys:
        try:
            out[k] = int(raw.get(k, "0"), 0)
        except ValueError:
            out[k] = 0
    return out
