"""A student's kernel module: built with kbridge's kbuild argv against the guest image's headers,
loaded and unloaded in the guest, and an oops in it mapped back to the student's source line."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kbridge import build as kbuild
from kbridge.errors import KbridgeError
from kbridge.images.image import Image
from kbridge.labs.grading import StudentCrash
from kbridge.labs.guest import GUEST_DIR, LogWatch, guest_run
from kbridge.render.kmod import ModuleSource
from kbridge.targets.base import Target
from kbridge.targets.qga import ChannelError

# "RIP: 0010:handler_pre+0x1d/0x60 [kprobe_lab]" (x86_64), "pc : handler_pre+0x1c/0x48 [kprobe_lab]"
# (arm64), and the same form in call traces.
_SITE = re.compile(r"(?P<func>[A-Za-z_][\w.]*)\+0x(?P<off>[0-9a-f]+)/0x[0-9a-f]+ \[(?P<mod>\w+)\]")


@dataclass
class BuiltModule:
    """A module that built: the .ko (with debug info, for oops mapping) and where it came from."""

    name: str
    ko: Path
    student_file: str  # the student's path, as shown in diagnostics
    warnings: list[str]


def build_student_module(name: str, source: str, student_file: str, image: Image, workdir: Path) -> BuiltModule:
    """Build NAME.c (the student's SOURCE) in WORKDIR; a compile error raises KbridgeError whose
    message shows each error at the student's file and line."""
    mod = ModuleSource(name, {f"{name}.c": source, "Kbuild": f"obj-m := {name}.o\n"})
    for fname, text in mod.files.items():
        (workdir / fname).write_text(text)
    cc = f"{image.arch.cross_compile()}gcc-12"
    if shutil.which(cc) is None or shutil.which("make") is None:
        raise KbridgeError(f"cannot build modules: make or {cc} not found", "kbridge doctor --fix installs them")
    proc = subprocess.run(
        kbuild.kbuild_argv(image, workdir), capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        text = kbuild.explain_build_failure(output, mod)
        # kbridge.build names the file it generated; here it is the student's own.
        text = re.sub(rf"(?m)^{re.escape(name)}\.c:", f"{student_file}:", text)
        text = text.replace(f"building {name}.ko failed:", f"{student_file} does not compile:", 1)
        raise KbridgeError(text)
    ko = workdir / f"{name}.ko"
    kbuild.check_vermagic(ko.read_bytes(), image.krel)
    warnings = [
        f"{student_file}:{m['line']}: warning: {m['msg']}"
        for raw in output.splitlines()
        if (m := kbuild._GCC_DIAG.match(raw.strip())) and m["kind"] == "warning"
    ]
    return BuiltModule(name, ko, student_file, warnings)


def imports(mod: BuiltModule, cross: str) -> set[str]:
    """The kernel symbols the module calls (its undefined symbols, resolved at insmod)."""
    out = subprocess.run([f"{cross}nm", "-u", str(mod.ko)], capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def oops_site(text: str, mod: BuiltModule, cross: str) -> str | None:
    """'file:line (function+0xOFF)' of the first frame in the student's module in an oops, if any."""
    for m in _SITE.finditer(text):
        if m["mod"] != mod.name:
            continue
        syms = subprocess.run([f"{cross}objdump", "-t", str(mod.ko)], capture_output=True, text=True).stdout
        for line in syms.splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1] == m["func"] and "F" in parts[1:-3]:
                section, value = parts[-3], int(parts[0], 16)
                where = subprocess.run(
                    [f"{cross}addr2line", "-e", str(mod.ko), "-j", section, f"{value + int(m['off'], 16):#x}"],
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                fname, _, lineno = where.rpartition(":")
                if lineno.split()[0].isdigit() and not fname.endswith("?"):
                    return f"{mod.student_file}:{lineno.split()[0]} ({m['func']}+0x{m['off']})"
        return f"{m['func']}+0x{m['off']} in {mod.name} (no line information)"
    return None


def crash_detail(crash: StudentCrash, mod: BuiltModule | None, cross: str) -> str:
    """The oops text for a failed check, led by the student's source line when it can be found."""
    site = oops_site(crash.text, mod, cross) if mod is not None else None
    head = f"{crash.message}, at {site}" if site else crash.message
    return f"{head}:\n{crash.text}"


class LoadedModule:
    """insmod/rmmod of a built module in the guest, with its parameters."""

    def __init__(self, target: Target, mod: BuiltModule, log: LogWatch) -> None:
        self.target = target
        self.mod = mod
        self.log = log
        self.guest_ko = f"{GUEST_DIR}/{mod.name}.ko"
        self.loaded = False
        stripped = mod.ko.with_suffix(".stripped.ko")
        # The guest needs no debug info (most of a .ko's size); the host copy keeps it for oopses.
        res = subprocess.run(
            [f"{target.arch.cross_compile()}objcopy", "--strip-debug", str(mod.ko), str(stripped)], capture_output=True
        )
        target.write_file(self.guest_ko, (stripped if res.returncode == 0 else mod.ko).read_bytes())

    def insmod(self, *params: str) -> tuple[bool, str]:
        """Load it; (loaded, what insmod and the module's own log lines said)."""
        self.unload_leftover()
        code, out = guest_run(self.target, ["/sbin/insmod", self.guest_ko, *params], self.log)
        self.loaded = code == 0
        said = "\n".join(self.log.mine(self.mod.name)[-10:])
        return self.loaded, (out.strip() + ("\n" + said if said else "")).strip()

    def rmmod(self) -> tuple[bool, str]:
        # rmmod takes well under a second; a hang here is a broken exit function (or a probe
        # left behind whose handlers were freed): do not wait the workload's minute for it.
        code, out = guest_run(self.target, ["/sbin/rmmod", self.mod.name], self.log, timeout=10)
        if code == 0:
            self.loaded = False
        return code == 0, out.strip()

    def unload_leftover(self) -> None:
        """A module of the same name left by an interrupted check would make insmod fail."""
        if self.mod.name in loaded_modules(self.target):
            self.target.run(["/sbin/rmmod", self.mod.name], timeout=60)

    def cleanup(self) -> None:
        """Unload if still loaded (best effort: after an oops the module may be stuck)."""
        with contextlib.suppress(Exception):
            if self.loaded:
                self.target.run(["/sbin/rmmod", self.mod.name], timeout=30)
        with contextlib.suppress(Exception):
            self.target.run(["/bin/busybox", "rm", "-f", self.guest_ko], timeout=10)


def loaded_modules(target: Target) -> set[str]:
    text = target.read_file("/proc/modules").decode(errors="replace")
    return {line.split()[0] for line in text.splitlines() if line.strip()}


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
    except ChannelError:
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
