"""`kbridge inspect SYMBOL`: how the target kernel really plants a kprobe there.

A generated module (kmod/inspect.c.j2) registers the kprobe disabled, then the
host steps it through arm -> remove, reading the instruction bytes at the probe
address (the module's debugfs `insn` file) and the probe's mode (debugfs
kprobes/list) between steps. The bytes are disassembled on the host with
objdump (aarch64-linux-gnu-objdump for arm64).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from kbridge.arch import Arch
from kbridge.build import build
from kbridge.errors import KbridgeError
from kbridge.mechanisms.kmod import explain_register_error
from kbridge.render.kmod import ModuleSource, template_dir
from kbridge.session import Session
from kbridge.spec import validate_symbol

NBYTES = 16  # enough for an x86 5-byte call/jump and the instruction after it, or 4 arm64 words
STEPS = ("before", "armed", "after")
_LIST_FLAGS = re.compile(r"\[(GONE|DISABLED|OPTIMIZED|FTRACE)\]")


@dataclass
class Inspection:
    """What the kernel did at one probe address, step by step."""

    requested: str
    symbol: str
    offset: int
    arch: str
    kernel: str
    address: int  # the symbol's address (kallsyms); the probe address adds the offset
    probe_address: int | None = None  # kp.addr as the kernel resolved it
    aliases: list[str] = field(default_factory=list)
    blacklisted: bool = False
    ftraceable: bool = False
    mode: str | None = None  # while armed: ftrace | optimized | breakpoint
    list_lines: dict[str, str] = field(default_factory=dict)  # step -> kprobes/list line ("" if none)
    insn: dict[str, str] = field(default_factory=dict)  # step -> hex bytes in memory order
    disasm: dict[str, list[str]] = field(default_factory=dict)
    hits: int = 0
    note: str | None = None

    def to_json(self) -> dict:
        return {"symbol": self.symbol, "requested": self.requested, "offset": self.offset,
                "address": f"{self.address:#x}",
                "probe_address": f"{self.probe_address:#x}" if self.probe_address is not None else None,
                "aliases": self.aliases, "blacklisted": self.blacklisted, "ftraceable": self.ftraceable,
                "mode": self.mode, "kprobes_list": self.list_lines, "insn": self.insn,
                "disasm": self.disasm, "arch": self.arch, "kernel": self.kernel, "hits_while_armed": self.hits}


def render_inspect(symbol: str, offset: int) -> ModuleSource:
    """The inspect module for SYMBOL+OFFSET (SYMBOL already validated and resolved)."""
    validate_symbol(symbol)
    if offset < 0:
        raise KbridgeError(f"invalid --offset {offset}: must be >= 0")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(template_dir()), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    key = hashlib.sha256(f"{symbol}+{offset}".encode()).hexdigest()[:8]
    name = f"kb_insp_{re.sub(r'[^A-Za-z0-9_]', '_', symbol)[:32]}_{key}"
    ctx = {"module": name, "symbol": symbol, "offset": offset, "nbytes": NBYTES}
    return ModuleSource(name, {f"{name}.c": env.get_template("inspect.c.j2").render(ctx),
                               "Kbuild": env.get_template("Kbuild.j2").render(ctx)})


def mode_of(list_line: str) -> str:
    """The probe mode a debugfs kprobes/list line shows: ftrace, optimized, breakpoint (or disabled/gone)."""
    flags = set(_LIST_FLAGS.findall(list_line))
    if "GONE" in flags:
        return "gone"
    if "DISABLED" in flags:
        return "disabled"
    if "FTRACE" in flags:
        return "ftrace"
    if "OPTIMIZED" in flags:
        return "optimized"
    return "breakpoint"


def find_list_line(text: str, symbol: str, offset: int) -> str:
    """Our probe's line in kprobes/list ('ADDR  k  SYMBOL+0xOFF  [FLAGS]'), or ''."""
    want = f"{symbol}+{offset:#x}"
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "k" and parts[2] == want:
            return line.strip()
    return ""


def disassemble(data: bytes, arch: Arch, address: int) -> list[str]:
    """objdump of raw bytes at ADDRESS: 'addr: bytes  insn' lines (empty if objdump is missing)."""
    tool = "objdump" if arch.name == "x86_64" and shutil.which("objdump") else f"{arch.gnu_triplet}-objdump"
    if shutil.which(tool) is None:
        return []
    machine = "i386:x86-64" if arch.name == "x86_64" else "aarch64"
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(data)
        f.flush()
        proc = subprocess.run([tool, "-D", "-b", "binary", "-m", machine, f"--adjust-vma={address:#x}", f.name],
                              capture_output=True, text=True)
    lines = []
    for line in proc.stdout.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line)
        if m:
            lines.append(f"{m[1]}: {' '.join(m[2].split())}")
    return lines


def aliases_of(session: Session, symbol: str, address: int) -> list[str]:
    """Other text symbols at ADDRESS (e.g. a syscall alias, a __pfx_ or .localalias twin)."""
    return sorted(name for name, entries in session.symbols.entries.items()
                  if name != symbol and any(a == address and t in "TtWw" for a, t in entries))


def is_ftraceable(session: Session, symbol: str) -> bool:
    """Whether SYMBOL is in tracefs available_filter_functions (grep in the guest: the file is large)."""
    for path in ("/sys/kernel/tracing/available_filter_functions",
                 "/sys/kernel/debug/tracing/available_filter_functions"):
        res = session.vm.run(["/bin/busybox", "grep", "-qxF", symbol, path], timeout=60)
        if res.exitcode in (0, 1):
            return res.exitcode == 0
    raise KbridgeError("could not read available_filter_functions in the guest (tracefs not mounted?)")


def inspect(session: Session, name: str, offset: int = 0) -> Inspection:
    """Resolve NAME on the session's kernel and show the probe's bytes and mode before, armed and after."""
    res = session.symbols.resolve(name, session.arch, frozenset())  # blacklist is reported, not refused
    ins = Inspection(name, res.symbol, offset, session.arch.name, session.vm.krel, res.address, note=res.note)
    ins.aliases = aliases_of(session, res.symbol, res.address)
    ins.blacklisted = res.symbol in session.blacklist
    ins.ftraceable = is_ftraceable(session, res.symbol)
    if ins.blacklisted:
        ins.mode = "blacklisted"
        return ins
    mod = render_inspect(res.symbol, offset)
    ko = build(mod, session.image)
    _step_through(session, mod.name, ko, ins)
    return ins


def _read_state(session: Session, module: str) -> dict[str, str]:
    text = session.vm.read_file(f"/sys/kernel/debug/{module}/insn").decode()
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def _ctl(session: Session, module: str, cmd: str) -> None:
    # The module name is generated ([a-z0-9_]) and CMD is one of ours: no user text reaches the shell.
    res = session.vm.run(["/bin/sh", "-c", f"echo {cmd} > /sys/kernel/debug/{module}/ctl"], timeout=30)
    if not res.ok:
        raise KbridgeError(f"{module}: '{cmd}' failed: {res.stderr.decode(errors='replace').strip()}")


def _record(session: Session, module: str, ins: Inspection, step: str) -> dict[str, str]:
    state = _read_state(session, module)
    ins.insn[step] = state.get("insn", "")
    ins.list_lines[step] = find_list_line(session.kprobes_list(), ins.symbol, ins.offset)
    return state


def _step_through(session: Session, module: str, ko: Path, ins: Inspection) -> None:
    vm = session.vm
    guest_ko = f"/tmp/{module}.ko"
    run_id = secrets.token_hex(4)
    vm.write_file(guest_ko, ko.read_bytes())
    loaded = False
    try:
        r = vm.run(["/sbin/insmod", guest_ko, f"run={run_id}"], timeout=60)
        if not r.ok:
            err = _register_errno(session, module, run_id)
            if err:
                raise explain_register_error(err, "kprobe", f"{ins.symbol}+{ins.offset:#x}")
            raise KbridgeError(f"insmod {module}.ko failed: {r.stderr.decode(errors='replace').strip()}")
        loaded = True
        state = _record(session, module, ins, "before")
        ins.probe_address = int(state["addr"], 16)
        # The symbol table may be cached from an earlier boot and KASLR moves the
        # kernel on every boot: the live address is the one the kernel resolved.
        ins.address = ins.probe_address - ins.offset
        _ctl(session, module, "arm")
        # x86 optimizes a breakpoint into a jump after a delay (OPTIMIZE_DELAY, 5 jiffies): let it settle.
        time.sleep(0.3)
        state = _record(session, module, ins, "armed")
        ins.mode = mode_of(ins.list_lines["armed"]) if ins.list_lines["armed"] else "unknown"
        vm.run(["/bin/busybox", "true"], timeout=30)  # some activity, so hits show the probe is live
        ins.hits = int(_read_state(session, module).get("hits", "0"))
        _ctl(session, module, "remove")
        # Unoptimizing (x86) is also deferred to the optimizer: poll until the text is restored.
        deadline = time.monotonic() + 2.0
        while True:
            _record(session, module, ins, "after")
            if ins.insn["after"] == ins.insn["before"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        if loaded:
            vm.run(["/sbin/rmmod", module], timeout=60)
        with contextlib.suppress(Exception):
            vm.run(["/bin/busybox", "rm", "-f", guest_ko], timeout=10)
    addr = ins.probe_address or ins.address + ins.offset
    for step, hexbytes in ins.insn.items():
        if hexbytes and hexbytes != "unreadable":
            ins.disasm[step] = disassemble(bytes.fromhex(hexbytes), session.arch, addr)


def _register_errno(session: Session, module: str, run_id: str) -> int | None:
    """The errno register_kprobe() returned, from the module's log line (dmesg)."""
    res = session.vm.run(["/bin/busybox", "dmesg"], timeout=30)
    m = re.search(rf"{module}: register_kprobe failed: (-?\d+) run={run_id}", res.stdout.decode(errors="replace"))
    return -int(m[1]) if m else None
