"""`kbridge inspect SYMBOL`: how the target kernel really plants a kprobe there.

(Over 500 lines: one walk through one probe's life, arm -> remove, and the explanation of what
was seen at each step; the per-arch facts it reads are arch.py's.)

A generated module (kmod/inspect.c.j2) registers the kprobe disabled, then the
host steps it through arm -> remove, reading the instruction bytes at the probe
address (the module's debugfs `insn` file) and the probe's mode (debugfs
kprobes/list) between steps. The bytes are disassembled on the host with
capstone. On a machine kbridge did not build and has no kernel headers for, a
kprobe event takes the module's place (defined: registered disabled; enabled:
armed; removed) and the bytes are read from /proc/kcore.

The kernel picks one of three ways to plant a kprobe: an ftrace callback when
the address is the function's ftrace site (x86_64: KPROBES_ON_FTRACE), a jump
to a detour buffer when the instructions there can be relocated (x86_64 and
32-bit arm: OPTPROBES, after a first breakpoint), else a breakpoint (int3 on
x86_64, BRK #4 on arm64, the undefined instruction UDF #24 on 32-bit arm).
Where the arch table lists them (Arch.insn_facts: 32-bit arm), the module also
reports how the kernel decoded the probed instruction: simulated, emulated from
a slot, or run in the detour buffer.
`force_breakpoint=True` forces the last: optimization off for the duration, and the
probe moved past an ftrace site; both are restored and reported.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kbridge import kprobes_list
from kbridge.arch import Arch
from kbridge.elf import segment_offset
from kbridge.errors import KbridgeError
from kbridge.kbuild import build_generated
from kbridge.mechanisms import templates
from kbridge.mechanisms.kmod.render import ModuleSource, name_for
from kbridge.mechanisms.refusals import explain_refusal
from kbridge.mechanisms.singlestep import insn_run
from kbridge.mechanisms.tracefs import guest as tracefs_guest
from kbridge.mechanisms.tracefs.collect import parse_kprobe_profile
from kbridge.session import Session
from kbridge.spec import validate_symbol
from kbridge.symbols import SymbolError
from kbridge.targets import ownership

NBYTES = 16  # enough for an x86 5-byte call/jump and the instruction after it, or 4 arm/arm64 words
STEPS = ("before", "armed", "after")
OPTIMIZATION = "/proc/sys/debug/kprobes-optimization"  # CONFIG_OPTPROBES only (Arch.optprobes)


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
    hits: int = 0  # the module's exact count, read after unregister_kprobe() (no hit can follow)
    nmissed: int = 0  # kp.nmissed, read with it
    note: str | None = None
    breakpoint: bool = False  # --breakpoint: the breakpoint path was forced
    requested_offset: int = 0  # what the user asked; `offset` may have moved past an ftrace site
    ftrace_site: bool = False  # the kernel flagged the address as an ftrace site at registration
    optimization: str | None = None  # kprobes-optimization as found (None: no CONFIG_OPTPROBES)
    changes: list[str] = field(default_factory=list)  # what --breakpoint changed, and that it was restored
    # The live kprobe's decoded instruction (Arch.insn_facts, e.g. arm's handler, slot, direct_exec).
    insn_facts: dict[str, str] = field(default_factory=dict)
    breakpoint_word: str = ""  # hex, memory order: the breakpoint the arch's kernel writes over these bytes
    insn_run: str = ""  # how the probed instruction runs while armed, from the mode and insn_facts
    why: str = ""  # one sentence: why the kernel chose this mode, and how to get the others

    def to_json(self) -> dict:
        return {
            "symbol": self.symbol,
            "requested": self.requested,
            "offset": self.offset,
            "requested_offset": self.requested_offset,
            "address": f"{self.address:#x}",
            "probe_address": f"{self.probe_address:#x}" if self.probe_address is not None else None,
            "aliases": self.aliases,
            "blacklisted": self.blacklisted,
            "ftraceable": self.ftraceable,
            "ftrace_site": self.ftrace_site,
            "mode": self.mode,
            "why": self.why,
            "insn_run": self.insn_run,
            "insn_facts": self.insn_facts,
            "breakpoint_word": self.breakpoint_word,
            "breakpoint_forced": self.breakpoint,
            "kprobes_optimization": self.optimization,
            "changes": self.changes,
            "kprobes_list": self.list_lines,
            "insn": self.insn,
            "disasm": self.disasm,
            "arch": self.arch,
            "kernel": self.kernel,
            "hits": self.hits,
            "nmissed": self.nmissed,
        }


def render_inspect(symbol: str, offset: int, arch: Arch | None = None) -> ModuleSource:
    """The inspect module for SYMBOL+OFFSET (SYMBOL already validated and resolved) on ARCH."""
    validate_symbol(symbol)
    if offset < 0:
        raise KbridgeError(f"invalid --offset {offset}: must be >= 0")
    env = templates.environment()
    name = name_for("insp", symbol, f"{symbol}+{offset}")
    facts = arch.insn_facts if arch else ()
    ctx = {"module": name, "symbol": symbol, "offset": offset, "nbytes": NBYTES, "insn_facts": facts}
    return ModuleSource(
        name,
        {
            f"{name}.c": env.get_template("inspect.c.j2").render(ctx),
            "Kbuild": env.get_template("Kbuild.j2").render(ctx),
        },
    )


def mode_of(list_line: str) -> str:
    """The probe mode a debugfs kprobes/list line shows: ftrace, optimized, breakpoint (or disabled/gone)."""
    return kprobes_list.mode_of(list_line)


def find_list_line(text: str, symbol: str, offset: int, address: int | None = None) -> str:
    """Our probe's line in kprobes/list ('ADDR  k  SYMBOL+0xOFF  [FLAGS]'), or ''.

    x86 IBT kernels (Debian's 6.12 on) move an entry probe past endbr64: the line then
    says SYMBOL+0x4, so the probe's live ADDRESS, when known, finds it too.
    """
    found = kprobes_list.find(text, symbol, offset, address)
    return found.line if found else ""


def disassemble(data: bytes, arch: Arch, address: int) -> list[str]:
    """DATA at ADDRESS as 'addr: bytes  insn' lines, disassembled with capstone for ARCH."""
    import capstone  # loaded by the one command that disassembles

    md = capstone.Cs(getattr(capstone, arch.capstone[0]), getattr(capstone, arch.capstone[1]))
    lines = []
    end = address
    while end < address + len(data):
        for insn in md.disasm(data[end - address :], end):
            lines.append(f"{insn.address:x}: {insn.bytes.hex(' ')} {insn.mnemonic} {insn.op_str}".rstrip())
            end = insn.address + insn.size
        if end >= address + len(data):
            break
        word = data[end - address : end - address + arch.insn_align]
        if arch.insn_align == 1 or len(word) < arch.insn_align:
            # x86: bytes capstone cannot decode (a breakpoint mid-instruction, padding), to the end.
            lines.append(f"{end:x}: {data[end - address :].hex(' ')} (bytes)")
            break
        # Fixed-length instructions: name the word capstone cannot decode and carry on after it.
        lines.append(f"{end:x}: {word.hex(' ')} {_undecoded(word, arch)}")
        end += arch.insn_align
    return lines


def _undecoded(word: bytes, arch: Arch) -> str:
    """A word capstone does not decode: arm's kprobe breakpoint with a condition field, or unknown."""
    value, bkpt = int.from_bytes(word, "little"), int.from_bytes(arch.breakpoint_insn, "little")
    if arch.breakpoint_keeps_cond and (value ^ bkpt) & 0x0FFFFFFF == 0:
        # arch_arm_kprobe() keeps the probed instruction's condition: capstone decodes only the "always" form.
        ours = next(iter(disassemble(arch.breakpoint_insn, arch, 0)), "").split(" ", 5)[-1]
        return f"{ours} (the kprobe breakpoint, with the condition field {value >> 28:#x} of the instruction)"
    return "(bytes)"


def aliases_of(session: Session, symbol: str, address: int) -> list[str]:
    """Other text symbols at ADDRESS (e.g. a syscall alias, a __pfx_ or .localalias twin)."""
    return sorted(
        name
        for name, entries in session.symbols.entries.items()
        if name != symbol and any(a == address and t in "TtWw" for a, t in entries)
    )


def inspect(session: Session, name: str, offset: int = 0, force_breakpoint: bool = False) -> Inspection:
    """Resolve NAME on the session's kernel and show the probe's bytes and mode before, armed and after.

    FORCE_BREAKPOINT forces the breakpoint path: kprobes-optimization 0 while armed
    (restored after) and, if the address is an ftrace site, the probe moved to
    the instruction after it. Inspection.changes says what was done.
    """
    try:
        res = session.symbols.resolve(name, session.arch, frozenset())  # blacklist is reported, not refused
    except SymbolError:
        # A function of a module loaded since the table was read (kbridge module load): MOD:SYM.
        if (found := session.resolve_in_modules(name)) is None:
            raise
        res = found
    ins = Inspection(
        name,
        res.symbol,
        offset,
        session.arch.name,
        session.target.krel,
        res.address,
        note=res.note,
        breakpoint=force_breakpoint,
        requested_offset=offset,
    )
    ins.aliases = aliases_of(session, res.symbol, res.address)
    ins.blacklisted = res.symbol in session.blacklist
    ins.ftraceable = session.is_ftraceable(res.symbol)
    if ins.blacklisted:
        ins.mode = "blacklisted"
        ins.why = (
            f"{res.symbol} is on the kprobe blacklist (debugfs kprobes/blacklist: code the kprobe "
            "machinery itself runs, or marked NOKPROBE_SYMBOL): register_kprobe() refuses it, "
            "in every mode"
        )
        return ins
    ins.optimization = _read_optional(session, OPTIMIZATION)
    if not session.image.has_headers():
        # A machine kbridge did not build, whose headers it has not fetched: no module needed.
        _inspect_with_events(session, ins, force_breakpoint)
        ins.why = why(ins, session.arch)
        return ins
    mod = render_inspect(res.symbol, offset, session.arch)
    ko = build_generated(mod.name, mod.files, session.image)
    if force_breakpoint and session.arch.kprobes_on_ftrace:
        state = _peek(session, mod.name, ko, ins)
        if state.get("ftrace", "0") != "0":
            # The kernel would attach through ftrace here whatever the optimizer says: probe the
            # instruction after the ftrace site instead (x86 IBT kernels moved +0 past endbr64 first).
            site = int(state["listed_offset"])
            ins.offset = site + session.arch.ftrace_site_len
            ins.changes.append(
                f"{res.symbol}+{site:#x} is the ftrace site, which a kprobe uses through "
                f"ftrace, never int3: probing {res.symbol}+{ins.offset:#x}, the instruction after it"
            )
            mod = render_inspect(res.symbol, ins.offset, session.arch)
            ko = build_generated(mod.name, mod.files, session.image)
    with _optimization_off(session, ins) if force_breakpoint else contextlib.nullcontext():
        _step_through(session, mod.name, ko, ins)
    if before := ins.insn.get("before"):
        ins.breakpoint_word = session.arch.breakpoint_for(bytes.fromhex(before)).hex()
    ins.insn_run = insn_run(session.arch, ins.mode or "", ins.insn_facts)
    ins.why = why(ins, session.arch)
    return ins


def _read_optional(session: Session, path: str) -> str | None:
    res = session.target.run(["/bin/busybox", "cat", path], timeout=30)
    return res.stdout.decode().strip() if res.ok else None


@contextlib.contextmanager
def _optimization_off(session: Session, ins: Inspection) -> Iterator[None]:
    """kprobes-optimization 0 for the block (all optimized probes fall back to int3), then as found."""
    was = ins.optimization
    if was is None:
        if not session.arch.optprobes:
            ins.changes.append(f"{ins.arch} has no jump optimization (no CONFIG_OPTPROBES): nothing to turn off")
        yield
        return
    if was == "0":
        ins.changes.append(f"{OPTIMIZATION} was already 0: left as it was")
        yield
        return
    _write_sysctl(session, OPTIMIZATION, "0")
    try:
        yield
    finally:
        _write_sysctl(session, OPTIMIZATION, was)
        now = _read_optional(session, OPTIMIZATION)
        ins.changes.append(
            f"{OPTIMIZATION} set to 0 while armed (every optimized kprobe in the guest "
            f"falls back to a breakpoint), then restored to {now}"
        )
        if now != was:
            raise KbridgeError(
                f"{OPTIMIZATION} is {now}, not {was} as before",
                f"kbridge vm exec -- sh -c 'echo {was} > {OPTIMIZATION}'",
            )


def _live_address(session: Session, symbol: str) -> int | None:
    """SYMBOL's address in the running kernel (/proc/kallsyms), or None if it is not listed once."""
    res = session.target.run(["/bin/busybox", "grep", "-F", "-w", "--", symbol, "/proc/kallsyms"], timeout=60)
    found = [ln.split() for ln in res.text.splitlines()]
    addrs = [int(f[0], 16) for f in found if len(f) >= 3 and f[2] == symbol and f[1] in "TtWw"]
    return addrs[0] if len(addrs) == 1 else None


def _write_sysctl(session: Session, path: str, value: str) -> None:
    # PATH is one of ours and VALUE a digit read back from it: no user text reaches the shell.
    if not value.isdigit():
        raise KbridgeError(f"unexpected value {value!r} in {path}")
    res = session.target.run(["/bin/sh", "-c", f"echo {value} > {path}"], timeout=30)
    if not res.ok:
        raise KbridgeError(f"could not write {value} to {path}: {res.stderr.decode(errors='replace').strip()}")


def _peek(session: Session, module: str, ko: Path, ins: Inspection) -> dict[str, str]:
    """Load the module (probe registered disabled), read its state, unload it: nothing is armed."""
    vm = session.target
    guest_ko = f"/tmp/{module}.ko"
    run_id = secrets.token_hex(4)
    vm.write_file(guest_ko, ko.read_bytes())
    try:
        _insmod(session, module, guest_ko, run_id, ins)
        try:
            state = _read_state(session, module)
            # Where the kernel put it, as kprobes/list says (SYMBOL+0x4 after an IBT endbr64).
            line = find_list_line(session.kprobes_list(), ins.symbol, ins.offset, int(state["addr"], 16))
            state["listed_offset"] = str(listed_offset(line, ins.offset))
            return state
        finally:
            vm.run(["/sbin/rmmod", module], timeout=60)
    finally:
        with contextlib.suppress(Exception):
            vm.run(["/bin/busybox", "rm", "-f", guest_ko], timeout=10)


def listed_offset(list_line: str, default: int) -> int:
    """The offset a kprobes/list line gives ('ADDR  k  SYMBOL+0xOFF  [FLAGS]'), else DEFAULT."""
    parts = list_line.split()
    if len(parts) >= 3 and (m := re.search(r"\+(0x[0-9a-f]+)$", parts[2])):
        return int(m[1], 16)
    return default


def why(ins: Inspection, arch: Arch) -> str:
    """One sentence: why the kernel planted the probe the way it did, and how to get the other modes."""
    # The offset the kernel really used: x86 IBT kernels move an entry probe past endbr64 (+0x4).
    offset = listed_offset(ins.list_lines.get("before", ""), ins.offset)
    if ins.probe_address is not None and ins.address:
        offset = ins.probe_address - ins.address
    where = f"{ins.symbol}+{offset:#x}"
    if offset != ins.offset:
        where += f" (the kernel moved the probe from +{ins.offset:#x}: IBT's endbr64 comes first)"
    trap = arch.breakpoint_name
    if ins.breakpoint_word and ins.breakpoint_word != arch.breakpoint_insn.hex():
        word = int.from_bytes(bytes.fromhex(ins.breakpoint_word), "little")
        trap += f" with the probed instruction's condition field kept ({word:#010x})"
    if ins.mode == "ftrace":
        return (
            f"{where} is {ins.symbol}'s ftrace site (the {arch.ftrace_site_len}-byte nop that ftrace turns into "
            "a call), so the kernel attaches the kprobe as an ftrace callback (KPROBES_ON_FTRACE: no trap and "
            f"no real single-step: the pre-handler sees {arch.ip_register} = addr + {arch.pre_ip_offset} as after "
            f"a trap, the post-handler addr + {arch.ftrace_site_len} as if the nop had been stepped); for "
            f"a {trap} use --breakpoint"
            + (f", for an optimized jump --offset {offset + arch.ftrace_site_len:#x}" if arch.optprobes else "")
        )
    if ins.mode == "optimized":
        return (
            f"{where} is not an ftrace site and its instructions can be copied to a detour buffer, "
            f"so the optimizer replaced the {trap} it first planted with a jump (OPTPROBES, "
            f"{OPTIMIZATION} = {ins.optimization}; a probe with a post-handler is never optimized); "
            f"for the {trap} use --breakpoint"
            + (", for the ftrace mode probe the function's entry (--offset 0)" if arch.kprobes_on_ftrace else "")
        )
    if ins.mode == "breakpoint":
        if not arch.kprobes_on_ftrace and not arch.optprobes:
            site = f"{ins.symbol}+{arch.ftrace_site:#x}" if arch.ftrace_site is not None else arch.ftrace_site_text
            cause = (
                f"{arch.name} has no kprobes-on-ftrace and no jump optimization: every kprobe is one "
                f"(the ftrace site, {site}, is refused)"
            )
        elif ins.breakpoint:
            cause = "--breakpoint turned jump optimization off" + (
                " and moved the probe past the ftrace site" if ins.offset != ins.requested_offset else ""
            )
        elif ins.optimization == "0":
            cause = f"jump optimization is off ({OPTIMIZATION} = 0)"
        else:
            cause = (
                "the optimizer could not relocate the instructions there (a jump target, an "
                "instruction that cannot run from a detour buffer, or too little room)"
            )
        others = []
        if arch.kprobes_on_ftrace:
            others.append("the function's entry uses ftrace")
        if arch.optprobes:
            # x86: away from the ftrace site; arm (no kprobes-on-ftrace): the entry too.
            others.append("other offsets usually an optimized jump" if arch.kprobes_on_ftrace else "an optimized jump")
        return (
            f"{where} is a {trap} because {cause}; the trap runs the pre-handler, the original "
            f"instruction is {ins.insn_run or arch.insn_after_trap}, then the post-handler runs"
            + (f"; without --breakpoint {' and '.join(others)}" if others else "")
        )
    return f"the kernel reported mode {ins.mode!r} for {where}"


def _read_state(session: Session, module: str) -> dict[str, str]:
    text = session.target.read_file(f"/sys/kernel/debug/{module}/insn").decode()
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def _ctl(session: Session, module: str, cmd: str) -> None:
    # The module name is generated ([a-z0-9_]) and CMD is one of ours: no user text reaches the shell.
    res = session.target.run(["/bin/sh", "-c", f"echo {cmd} > /sys/kernel/debug/{module}/ctl"], timeout=30)
    if not res.ok:
        raise KbridgeError(f"{module}: '{cmd}' failed: {res.stderr.decode(errors='replace').strip()}")


def _record(session: Session, module: str, ins: Inspection, step: str) -> dict[str, str]:
    state = _read_state(session, module)
    ins.insn[step] = state.get("insn", "")
    ins.list_lines[step] = find_list_line(session.kprobes_list(), ins.symbol, ins.offset, ins.probe_address)
    return state


def _step_through(session: Session, module: str, ko: Path, ins: Inspection) -> None:
    vm = session.target
    guest_ko = f"/tmp/{module}.ko"
    run_id = secrets.token_hex(4)
    vm.write_file(guest_ko, ko.read_bytes())
    loaded = False
    try:
        _insmod(session, module, guest_ko, run_id, ins)
        loaded = True
        state = _record(session, module, ins, "before")
        ins.probe_address = int(state["addr"], 16)
        ins.ftrace_site = state.get("ftrace", "0") != "0"
        # The symbol table may be cached from an earlier boot and KASLR moves the
        # kernel on every boot: read the live address. kp.addr is no substitute:
        # on IBT kernels (x86_64 6.12+) the kernel moves an entry probe past endbr64.
        ins.address = _live_address(session, ins.symbol) or ins.probe_address - ins.offset
        _ctl(session, module, "arm")
        # x86 optimizes a breakpoint into a jump after a delay (OPTIMIZE_DELAY, 5 jiffies): let it settle.
        time.sleep(0.3)
        state = _record(session, module, ins, "armed")
        ins.mode = mode_of(ins.list_lines["armed"]) if ins.list_lines["armed"] else "unknown"
        ins.insn_facts = {k.removeprefix("insn_"): v for k, v in state.items() if k.startswith("insn_")}
        vm.run(["/bin/busybox", "true"], timeout=30)  # some activity, so hits show the probe is live
        _ctl(session, module, "remove")
        # After unregister_kprobe() no handler runs: these are the final counts, the ones the
        # module's unload message prints.
        final = _read_state(session, module)
        ins.hits = int(final.get("hits", "0"))
        ins.nmissed = int(final.get("nmissed", "0"))
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


# -- without a module: a kprobe event and /proc/kcore -------------------------------------

EVENT_GROUP = "kbinspect"
KCORE = "/proc/kcore"
KCORE_HEADER = 1 << 16  # the ELF header and its program headers come first


def _inspect_with_events(session: Session, ins: Inspection, force_breakpoint: bool) -> None:
    """The same steps through a kprobe event (defined: registered disabled; enabled: armed; removed),
    the bytes read from /proc/kcore and the counts from kprobe_profile. Needs no kernel headers."""
    header = _kcore_header(session)
    if force_breakpoint and session.arch.kprobes_on_ftrace:
        listed = _events_peek(session, ins)
        if "[FTRACE]" in listed:
            site = listed_offset(listed, ins.offset)
            ins.offset = site + session.arch.ftrace_site_len
            ins.changes.append(
                f"{ins.symbol}+{site:#x} is the ftrace site, which a kprobe uses through "
                f"ftrace, never int3: probing {ins.symbol}+{ins.offset:#x}, the instruction after it"
            )
    with _optimization_off(session, ins) if force_breakpoint else contextlib.nullcontext():
        _events_step_through(session, ins, header)
    addr = ins.probe_address or ins.address + ins.offset
    for step, hexbytes in ins.insn.items():
        if hexbytes and hexbytes != "unreadable":
            ins.disasm[step] = disassemble(bytes.fromhex(hexbytes), session.arch, addr)


def _kcore_header(session: Session) -> bytes:
    res = session.target.run(
        ["/bin/busybox", "dd", f"if={KCORE}", f"bs={KCORE_HEADER}", "count=1", "status=none"], timeout=60
    )
    if not res.ok or not res.stdout.startswith(b"\x7fELF"):
        raise KbridgeError(
            f"cannot read {KCORE} in {session.target.name}: {res.stderr.decode(errors='replace').strip() or 'no ELF'}",
            "inspect reads the kernel's text there when it has no kernel headers to build its module: install "
            "the headers in the machine, or boot without lockdown (CONFIG_PROC_KCORE is needed)",
        )
    return res.stdout


def _text_bytes(session: Session, header: bytes, address: int) -> str:
    """NBYTES at ADDRESS of the live kernel, as hex ('unreadable' when kcore does not map them)."""
    at = segment_offset(header, address, NBYTES)
    if at is None:
        return "unreadable"
    res = session.target.run(
        ["/bin/busybox", "dd", f"if={KCORE}", "bs=1", f"skip={at}", f"count={NBYTES}", "status=none"], timeout=60
    )
    return res.stdout.hex() if res.ok and len(res.stdout) == NBYTES else "unreadable"


def _event_line(ins: Inspection, name: str) -> str:
    return f"p:{EVENT_GROUP}/{name} {ins.symbol}+{ins.offset}"


def _events_peek(session: Session, ins: Inspection) -> str:
    """Define the event (registered, not armed), read its kprobes/list line, remove it."""
    vm = session.target
    name = f"p{secrets.token_hex(4)}"
    with ownership.owned(vm, "event", f"{EVENT_GROUP}/{name}"):
        tracefs_guest.define(vm, _event_line(ins, name))
        try:
            return find_list_line(session.kprobes_list(), ins.symbol, ins.offset)
        finally:
            vm.write_file(tracefs_guest.KPROBE_EVENTS, f"-:{EVENT_GROUP}/{name}\n".encode(), mode="a")


def _events_step_through(session: Session, ins: Inspection, header: bytes) -> None:
    vm = session.target
    name = f"i{secrets.token_hex(4)}"
    enable = f"{tracefs_guest.TRACING}/events/{EVENT_GROUP}/{name}/enable"

    def record(step: str) -> None:
        address = ins.probe_address or ins.address + ins.offset
        ins.insn[step] = _text_bytes(session, header, address)
        ins.list_lines[step] = find_list_line(session.kprobes_list(), ins.symbol, ins.offset, ins.probe_address)

    with ownership.owned(vm, "event", f"{EVENT_GROUP}/{name}"):
        tracefs_guest.define(vm, _event_line(ins, name))  # a refusal is the kernel's own verdict
        enabled = False
        try:
            listed = find_list_line(session.kprobes_list(), ins.symbol, ins.offset)
            ins.probe_address = int(listed.split()[0], 16) if listed else None
            ins.ftrace_site = "[FTRACE]" in listed
            ins.address = _live_address(session, ins.symbol) or (ins.probe_address or 0) - ins.offset
            record("before")
            vm.write_file(enable, b"1")
            enabled = True
            time.sleep(0.3)  # x86 optimizes a breakpoint into a jump after a delay: let it settle
            record("armed")
            ins.mode = mode_of(ins.list_lines["armed"]) if ins.list_lines["armed"] else "unknown"
            vm.run(["/bin/busybox", "true"], timeout=30)  # some activity, so hits show the probe is live
            vm.write_file(enable, b"0")
            enabled = False
            profile = parse_kprobe_profile(vm.read_file(f"{tracefs_guest.TRACING}/kprobe_profile").decode())
            ins.hits, ins.nmissed = profile.get(name, profile.get(f"{EVENT_GROUP}/{name}", (0, 0)))
        finally:
            if enabled:
                with contextlib.suppress(KbridgeError):
                    vm.write_file(enable, b"0")
            vm.write_file(tracefs_guest.KPROBE_EVENTS, f"-:{EVENT_GROUP}/{name}\n".encode(), mode="a")
    deadline = time.monotonic() + 2.0  # unoptimizing (x86) is deferred to the optimizer as well
    while True:
        record("after")
        if ins.insn["after"] == ins.insn["before"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)


def _insmod(session: Session, module: str, guest_ko: str, run_id: str, ins: Inspection) -> None:
    r = session.target.run(["/sbin/insmod", guest_ko, f"run={run_id}"], timeout=60)
    if not r.ok:
        err = _register_errno(session, module, run_id)
        if err:
            raise explain_refusal(err, "kprobe", session.arch, ins.symbol, ins.offset, ins.ftraceable)
        raise KbridgeError(f"insmod {module}.ko failed: {r.stderr.decode(errors='replace').strip()}")


def _register_errno(session: Session, module: str, run_id: str) -> int | None:
    """The errno register_kprobe() returned, from the module's log line (dmesg)."""
    res = session.target.run(["/bin/busybox", "dmesg"], timeout=30)
    m = re.search(rf"{module}: register_kprobe failed: (-?\d+) run={run_id}", res.stdout.decode(errors="replace"))
    return -int(m[1]) if m else None
