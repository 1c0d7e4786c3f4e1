"""gdb on a guest kernel: QEMU's gdb stub (`kbridge vm up --gdb`), the kernel's vmlinux, and the user's
modules' symbols at the addresses the running kernel loaded them at.

    plan = debugger.prepare(target)            # reads the guest's /sys/module/NAME/sections
    subprocess.run(plan.argv(batch=True, scripts=[Path("mine.gdb")]))

The command file kbridge writes for gdb-multiarch: `file vmlinux` (the debug kernel's or a tree's,
with DWARF; its vmlinux-gdb.py loads beside it, so lx-symbols, lx-dmesg... work), `target remote` on
the stub's Unix socket, then for each loaded module kbridge built (the user's own) `add-symbol-file`
of its copy with debug info with the address of *every* section: gcc puts parts of functions in
`.text.unlikely` (an .isra clone, a .cold part), and a breakpoint set through `.text` alone lands
in the wrong place. gdb quits by detaching (QEMU's stub says the target was attached): the guest runs on.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kbridge import debuginfo, kernels
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images import debugkernel
from kbridge.images.image import Image
from kbridge.session import Session
from kbridge.targets import gdb_socket
from kbridge.targets.base import Target

GDB = "gdb-multiarch"
_SECTION = re.compile(r"[\w.][\w.-]*")
_ADDRESS = re.compile(r"0x[0-9a-f]{1,16}")
# Sections /sys/module/M/sections lists that hold no code or data gdb looks up.
_SKIP = re.compile(r"\.(note|symtab|strtab)\b.*")


@dataclass(frozen=True)
class ModuleSymbols:
    """A loaded module of the user's: its copy with debug info, and where each section of it is."""

    name: str
    ko: Path
    source: str
    sections: dict[str, int]

    def command(self) -> str:
        """gdb's add-symbol-file for it: .text positional, every other section with -s."""
        others = " ".join(f"-s {name} {addr:#x}" for name, addr in sorted(self.sections.items()) if name != ".text")
        return f"add-symbol-file {self.ko} {self.sections['.text']:#x} {others}".rstrip()


@dataclass
class Plan:
    """What `kbridge gdb` runs: gdb's first commands, and what a user should know."""

    arch: Arch
    socket: Path
    vmlinux: Path | None
    modules: list[ModuleSymbols]
    substitute: tuple[str, Path] | None = None  # DWARF's build path prefix -> where the sources are
    notes: list[str] = field(default_factory=list)

    def commands(self) -> list[str]:
        """The command file: symbols, the connection, the modules."""
        cmds = ["set pagination off", "set confirm off"]
        if self.vmlinux is not None:
            # vmlinux-gdb.py beside vmlinux (lx-symbols, lx-dmesg, ...) loads with it once its directory is safe.
            cmds += [f"add-auto-load-safe-path {self.vmlinux.parent}", f"file {self.vmlinux}"]
        else:
            cmds.append(f"set architecture {self.arch.gdb_architecture}")
        if self.substitute is not None:
            cmds.append(f"set substitute-path {self.substitute[0]} {self.substitute[1]}")
        cmds.append(f"target remote {self.socket}")
        cmds += [m.command() for m in self.modules]
        return cmds

    def argv(
        self, script: Path, scripts: Sequence[Path] = (), commands: Sequence[str] = (), batch: bool = False
    ) -> list[str]:
        """gdb-multiarch's command line: kbridge's command file SCRIPT, then the user's files and commands."""
        argv = [GDB, "-q"]
        if batch:
            argv.append("-batch")
        argv += ["-x", str(script)]
        for s in scripts:
            argv += ["-x", str(s)]
        for c in commands:
            argv += ["-ex", c]
        return argv


def parse_sections(listing: str) -> dict[str, int]:
    """`NAME ADDRESS` lines (the guest's /sys/module/M/sections) as {name: address}, each checked: the
    text becomes gdb commands, so a line that is not a section name and a hex address is refused."""
    out = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        name, addr = parts
        if not _SECTION.fullmatch(name) or not _ADDRESS.fullmatch(addr):
            raise KbridgeError(f"unexpected module section line from the guest: {line!r}")
        if not _SKIP.fullmatch(name):
            out[name] = int(addr, 16)
    return out


# Each file of /sys/module/$1/sections (the names start with a dot: list them with .*), one
# "NAME ADDRESS" line each. The module name is passed as $1, never spliced into the script.
_LIST_SECTIONS = 'cd "/sys/module/$1/sections" && for f in .* *; do [ -f "$f" ] && echo "$f $(cat "$f")"; done'


def user_modules(target: Target) -> list[ModuleSymbols]:
    """The loaded out-of-tree modules kbridge built for TARGET's kernel, with their sections' addresses."""
    session = Session(target)
    found = []
    for name, flags in sorted(session.modules().items()):
        built = debuginfo.built_module(name, target.krel, target.arch.name) if "O" in flags else None
        if built is None:
            continue
        res = target.run(["/bin/busybox", "sh", "-c", _LIST_SECTIONS, "sh", name], timeout=30)
        sections = parse_sections(res.text)
        if ".text" in sections:
            found.append(ModuleSymbols(name, built[0], built[1], sections))
    return found


def vmlinux_note(image: Image) -> str | None:
    """What gdb lacks without the kernel's DWARF, and how to get it, for IMAGE; None when it has it."""
    if image.vmlinux is not None:
        return None
    if kernels.is_debian(image.key):
        return (
            f"Debian's kernel {image.krel} ships without debug info: gdb has your modules' symbols but not the "
            f"kernel's. linux-image-{image.krel}-dbg has its vmlinux with DWARF (~860 MB to download for 6.1): "
            "kbridge gdb --dbg fetches it, or use --kernel debug"
        )
    return f"{image.dir} has no vmlinux: gdb has your modules' symbols but not the kernel's"


def prepare(target: Target) -> Plan:
    """What gdb needs for TARGET, read now from the running guest (its modules' addresses)."""
    socket = gdb_socket(target)
    if socket is None:
        up = kernels.up_hint(target.arch.name, target.image.key)
        raise KbridgeError(
            f"the {target.arch.name} VM was started without QEMU's gdb stub",
            f"kbridge vm down --arch {target.arch.name}, then {up} --gdb",
        )
    if shutil.which(GDB) is None:
        raise KbridgeError(f"{GDB} is not installed", "sudo apt-get install gdb-multiarch")
    image = target.image
    plan = Plan(target.arch, socket, image.vmlinux, user_modules(target))
    if (note := vmlinux_note(image)) is not None:
        plan.notes.append(note)
    if image.key == kernels.DEBUG and image.vmlinux is not None:
        tree = debugkernel.tree_dir(target.arch)
        if (tree / "src").is_dir():
            plan.substitute = (debugkernel.DEBUG_PREFIX, tree)
        else:
            plan.notes.append(
                "the debug kernel's sources are not kept, so gdb names its lines but cannot list them "
                "(kbridge image build --kernel debug --rebuild --keep-tree keeps them)"
            )
    return plan
