"""ProbeSpec: what the user asked to probe, independent of the mechanism that will do it.

Everything here is validated when it is built: symbols and argument names are
identifiers, never pasted into C, shell or tracefs text unchecked.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field

from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError

HANDLERS = ("pre", "post", "entry", "ret")
KPROBE_HANDLERS = frozenset({"pre", "post"})
KRETPROBE_HANDLERS = frozenset({"entry", "ret"})
KSYM_NAME_LEN = 128  # include/linux/kallsyms.h in 6.1 (raised to 512 in 6.2)
KRETPROBE_MAXACTIVE_MAX = 4096  # kernel/trace/trace_kprobe.c
PID_MAX_LIMIT = 4 * 1024 * 1024  # include/linux/threads.h on 64-bit
MAX_OFFSET = 1 << 20  # far beyond any function; the symbol table bounds it exactly once resolved

# A kernel symbol: a C identifier, optionally with compiler suffixes (.isra.0, .constprop.1).
# MOD:SYM names a function of one loaded module, as tracefs and kallsyms_lookup_name (6.1) take it.
_SYMBOL = re.compile(r"([A-Za-z0-9_-]{1,55}:)?[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_C_KEYWORDS = frozenset(
    """
    auto break case char const continue default do double else enum extern float for goto if inline
    int long register restrict return short signed sizeof static struct switch typedef union
    unsigned void volatile while _Bool bool true false NULL
    """.split()
)
# Names the generated C and the hit format use for themselves.
_RESERVED_ARGS = frozenset({"hit", "pid", "cpu", "comm", "ret", "retval", "seq"})


@dataclass(frozen=True)
class ArgSpec:
    """Fetch the INDEX-th (1-based) function argument and report it as NAME."""

    name: str
    index: int


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: where, which handlers, which arguments."""

    symbol: str
    handlers: frozenset[str] = frozenset({"pre"})
    offset: int = 0
    args: tuple[ArgSpec, ...] = ()
    maxactive: int = 0  # kretprobe instances; 0 lets the kernel choose
    pid: int | None = None  # only count/report this process (tgid): all of its threads
    comm: str | None = None  # only count/report tasks with this comm
    fault: bool = False  # kprobe fault_handler (Linux <= 5.13): report faults taken in the handlers
    tid: int | None = None  # only count/report this thread (a task's own pid)

    @property
    def kprobe(self) -> bool:
        return bool(self.handlers & KPROBE_HANDLERS)

    @property
    def kretprobe(self) -> bool:
        return bool(self.handlers & KRETPROBE_HANDLERS)

    def with_symbol(self, symbol: str) -> ProbeSpec:
        from dataclasses import replace

        return replace(self, symbol=symbol)


def validate_symbol(symbol: str) -> str:
    """SYMBOL if it is a well-formed kernel symbol name; otherwise a KbridgeError quoting it."""
    if not _SYMBOL.fullmatch(symbol or ""):
        raise KbridgeError(
            f"invalid symbol {symbol!r}: a kernel symbol is a C identifier (optionally with a suffix such as .isra.0)",
            "e.g. kbridge probe ksys_write --pre",
        )
    if len(symbol) >= KSYM_NAME_LEN:
        raise KbridgeError(f"symbol {symbol[:40]!r}... is longer than KSYM_NAME_LEN ({KSYM_NAME_LEN})")
    return symbol


def parse_arg(text: str, arch: Arch | None = None) -> ArgSpec:
    """Parse a --arg value NAME=N (N is the 1-based argument position)."""
    name, sep, index = text.partition("=")
    if not sep:
        raise KbridgeError(f"invalid --arg {text!r}: expected NAME=N", "e.g. --arg fd=1 --arg count=3")
    if not _IDENT.fullmatch(name) or name in _C_KEYWORDS or keyword.iskeyword(name):
        raise KbridgeError(f"invalid argument name {name!r} in --arg {text!r}: use a C identifier")
    if name in _RESERVED_ARGS:
        raise KbridgeError(
            f"argument name {name!r} in --arg {text!r} is reserved",
            f"pick another name; reserved: {', '.join(sorted(_RESERVED_ARGS))}",
        )
    if not (index.isascii() and index.isdigit()):  # "²".isdigit() is True, int("²") fails
        raise KbridgeError(f"invalid argument position {index!r} in --arg {text!r}: expected 1, 2, ...")
    n = int(index)
    limit = arch.max_args if arch else 8
    if not 1 <= n <= limit:
        where = f" on {arch.name}" if arch else ""
        stack = f" ({len(arch.arg_registers)} in registers, then the stack)" if arch and arch.stack_args else ""
        raise KbridgeError(
            f"argument position {n} in --arg {text!r} is out of range{where}", f"arguments are 1..{limit}{stack}"
        )
    return ArgSpec(name, n)


def make_spec(
    symbol: str,
    handlers: set[str],
    args: list[str] | None = None,
    arch: Arch | None = None,
    offset: int = 0,
    maxactive: int = 0,
    pid: int | None = None,
    comm: str | None = None,
    fault: bool = False,
    tid: int | None = None,
) -> ProbeSpec:
    """Build and validate a ProbeSpec from command-line style values."""
    validate_symbol(symbol)
    if not handlers:
        raise KbridgeError("no handler chosen", "add --pre, --post (kprobe) or --entry, --ret (kretprobe)")
    unknown = set(handlers) - set(HANDLERS)
    if unknown:
        raise KbridgeError(f"unknown handler(s) {sorted(unknown)}", f"handlers are {', '.join(HANDLERS)}")
    parsed = tuple(parse_arg(a, arch) for a in args or ())
    names = [a.name for a in parsed]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise KbridgeError(f"argument name(s) {dup} given twice in --arg")
    if offset < 0:
        raise KbridgeError(f"invalid offset {offset}: must be >= 0")
    if offset and handlers & KRETPROBE_HANDLERS:
        raise KbridgeError(
            f"a kretprobe must be at a function entry, not {symbol}+{offset:#x}", "drop the offset, or use --pre/--post"
        )
    if not 0 <= maxactive <= KRETPROBE_MAXACTIVE_MAX:
        raise KbridgeError(f"--maxactive {maxactive} is out of range 0..{KRETPROBE_MAXACTIVE_MAX}")
    if comm is not None and (not re.fullmatch(r"[\x21-\x7e]{1,15}", comm) or any(c in comm for c in '"\\')):
        raise KbridgeError(f"invalid --comm {comm!r}: 1-15 printable characters without spaces, quotes or backslashes")
    if pid is not None and not 0 < pid <= PID_MAX_LIMIT:
        raise KbridgeError(f"invalid --pid {pid}: guest pids are 1..{PID_MAX_LIMIT}")
    if tid is not None and not 0 < tid <= PID_MAX_LIMIT:
        raise KbridgeError(f"invalid --tid {tid}: guest thread ids are 1..{PID_MAX_LIMIT}")
    if offset > MAX_OFFSET:
        raise KbridgeError(
            f"invalid --offset {offset}: no function is that long",
            "offsets are bytes into the function, e.g. --offset 4",
        )
    if fault and not handlers & KPROBE_HANDLERS:
        raise KbridgeError(
            "--fault needs a kprobe handler: the fault handler belongs to struct kprobe", "add --pre (or --post)"
        )
    return ProbeSpec(symbol, frozenset(handlers), offset, parsed, maxactive, pid, comm, fault, tid)


@dataclass
class Hit:
    """One handler invocation, whatever mechanism reported it.

    ``addr`` is the probe address; ``ip`` and ``flags`` are the instruction
    pointer and flags register the handler saw in its pt_regs (on arm64 the pc
    and pstate, on arm the pc and cpsr: JSON names them so). A pre-handler runs from the breakpoint, a
    post-handler after the probed instruction was single-stepped, so ``ip``
    moves across that instruction. ``duration_ns`` is a return hit's time
    since the function's entry; ``trap`` a fault hit's trap number and
    ``fault_at`` the instruction that faulted (``symbol+0xoff/0xlen``).
    """

    mechanism: str
    symbol: str
    handler: str  # pre | post | entry | ret | fault
    pid: int
    comm: str
    cpu: int
    args: dict[str, int | str] = field(default_factory=dict)
    retval: int | None = None
    timestamp: float | None = None  # seconds, guest clock
    tid: int | None = None
    addr: int | None = None
    ip: int | None = None
    flags: int | None = None
    arch: str | None = None  # names ip/flags in JSON: "pc"/"pstate" on arm64, "pc"/"cpsr" on arm
    duration_ns: int | None = None
    trap: int | None = None
    fault_at: str | None = None  # a fault hit's faulting instruction, as the kernel's %pS prints it
    mode: str | None = None  # how the kernel armed the probe that fired: breakpoint | ftrace | optimized

    @property
    def ip_name(self) -> str:
        """The instruction pointer's name on the hit's arch (ip, pc)."""
        return get_arch(self.arch).ip_register if self.arch else "ip"

    @property
    def flags_name(self) -> str:
        """The flags register's name on the hit's arch (flags, pstate, cpsr)."""
        return get_arch(self.arch).flags_register if self.arch else "flags"

    def to_json(self) -> dict:
        out: dict = {
            "mechanism": self.mechanism,
            "symbol": self.symbol,
            "handler": self.handler,
            "pid": self.pid,
            "comm": self.comm,
            "cpu": self.cpu,
            "args": self.args,
        }
        if self.tid is not None:
            out["tid"] = self.tid
        if self.handler == "ret" or self.retval is not None:
            out["retval"] = self.retval
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        if self.addr is not None:
            out["addr"] = f"{self.addr:#x}"
        if self.ip is not None:
            out[self.ip_name] = f"{self.ip:#x}"
        if self.flags is not None:
            out[self.flags_name] = f"{self.flags:#x}"
        if self.duration_ns is not None:
            out["duration_ns"] = self.duration_ns
        if self.trap is not None:
            out["trap"] = self.trap
            if self.arch:
                out["trap_hex"] = f"{self.trap:#x}"
                out["trap_decoded"] = get_arch(self.arch).describe_trap(self.trap)
        if self.fault_at is not None:
            out["fault_at"] = self.fault_at
        if self.mode is not None:
            out["mode"] = self.mode
        return out
