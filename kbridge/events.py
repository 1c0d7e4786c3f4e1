"""The kprobe_events grammar of Linux 6.1 and its drift in 5.10, 6.12 and 7.x, with the kernel's own verdicts.

`parse()` turns one line written to ``/sys/kernel/tracing/kprobe_events`` into a
typed model, `format()` turns it back.  Invalid lines raise `EventSyntaxError`
carrying the kernel's error class, message and caret position, computed the way
the kernel computes them, so a line can be checked offline before it reaches a
guest.  A `Grammar` (kernel version, arch, IBT, BTF arguments) selects what
differs between kernels; each difference is tested against the error_log of
Debian's kernels (tests/unit/data/error_log/).

Reference: linux-6.1.119 (the Debian bookworm kernel line), files
``kernel/trace/trace_kprobe.c`` (``__trace_kprobe_create``),
``kernel/trace/trace_probe.c`` (``traceprobe_parse_probe_arg``,
``parse_probe_arg``, ``parse_probe_vars``, ``traceprobe_parse_event_name``,
``__trace_probe_log_err``), ``kernel/trace/trace_probe.h`` (``ERRORS``),
``kernel/trace/trace_dynevent.c`` (``dyn_event_release``) and
``kernel/trace/trace.c`` (``tracing_log_err``, ``trace_parse_run_command``).
The parser follows the order of the kernel's checks, so when a line has several
faults the reported one is the one the kernel reports.

What is not checked offline, because it needs the running kernel: whether a
symbol exists or is unique (``BAD_PROBE_ADDR``/``NON_UNIQ_SYMBOL``), instruction
boundaries (``BAD_INSN_BNDRY``), notrace functions, and name clashes with
existing events (``EVENT_EXIST``, ``DIFF_PROBE_TYPE``, ``SAME_PROBE``...).
Positions are character offsets; the kernel counts bytes, which only differs
for non-ASCII input, which no valid command contains.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import NoReturn, Union

from kbridge.arch import ARCHES
from kbridge.errors import KbridgeError

# --- limits, from linux-6.1 -------------------------------------------------

MAX_EVENT_NAME_LEN = 64  # kernel/trace/trace.h
MAX_TRACE_ARGS = 128  # trace_probe.h; 6.1 silently ignores args past this
MAX_ARGSTR_LEN = 63  # trace_probe.h: longest FETCHARG body (after NAME=)
MAX_ARRAY_LEN = 64
MAX_ARG_NAME_LEN = 32
FETCH_INSN_MAX = 16  # trace_probe.h: fetch + deref*N + store + mod + end
KRETPROBE_MAXACTIVE_MAX = 4096  # trace_kprobe.c
# PARAM_MAX_STACK = THREAD_SIZE / sizeof(long): 16 KiB stacks on both x86_64
# (page_64_types.h, no KASAN) and arm64 (memory.h, 4 KiB pages).
PARAM_MAX_STACK = 16384 // 8
DEFAULT_GROUP = "kprobes"  # KPROBE_EVENT_SYSTEM

# trace_probe.h ERRORS, in order, as in linux-6.1.119 (NON_UNIQ_SYMBOL and
# BAD_SYMSTRING are 6.1.y stable backports; BTF/fprobe/tprobe errors such as
# TOO_MANY_ARGS or NOSUP_BTFARG only exist from 6.5 on).
ERRORS: dict[str, str] = {
    "FILE_NOT_FOUND": "Failed to find the given file",
    "NO_REGULAR_FILE": "Not a regular file",
    "BAD_REFCNT": "Invalid reference counter offset",
    "REFCNT_OPEN_BRACE": "Reference counter brace is not closed",
    "BAD_REFCNT_SUFFIX": "Reference counter has wrong suffix",
    "BAD_UPROBE_OFFS": "Invalid uprobe offset",
    "MAXACT_NO_KPROBE": "Maxactive is not for kprobe",
    "BAD_MAXACT": "Invalid maxactive number",
    "MAXACT_TOO_BIG": "Maxactive is too big",
    "BAD_PROBE_ADDR": "Invalid probed address or symbol",
    "NON_UNIQ_SYMBOL": "The symbol is not unique",
    "BAD_RETPROBE": "Retprobe address must be an function entry",
    "BAD_ADDR_SUFFIX": "Invalid probed address suffix",
    "NO_GROUP_NAME": "Group name is not specified",
    "GROUP_TOO_LONG": "Group name is too long",
    "BAD_GROUP_NAME": "Group name must follow the same rules as C identifiers",
    "NO_EVENT_NAME": "Event name is not specified",
    "EVENT_TOO_LONG": "Event name is too long",
    "BAD_EVENT_NAME": "Event name must follow the same rules as C identifiers",
    "EVENT_EXIST": "Given group/event name is already used by another event",
    "RETVAL_ON_PROBE": "$retval is not available on probe",
    "BAD_STACK_NUM": "Invalid stack number",
    "BAD_ARG_NUM": "Invalid argument number",
    # Debian's 6.1.y (checked on 6.1.0-56, 6.1.192) prints the fixed spelling;
    # older kernels said "Invalid $-valiable specified", still mapped below.
    "BAD_VAR": "Invalid $-variable specified",
    "BAD_REG_NAME": "Invalid register name",
    "BAD_MEM_ADDR": "Invalid memory address",
    "BAD_IMM": "Invalid immediate value",
    "IMMSTR_NO_CLOSE": "String is not closed with '\"'",
    "FILE_ON_KPROBE": "File offset is not available with kprobe",
    "BAD_FILE_OFFS": "Invalid file offset value",
    "SYM_ON_UPROBE": "Symbol is not available with uprobe",
    "TOO_MANY_OPS": "Dereference is too much nested",
    "DEREF_NEED_BRACE": "Dereference needs a brace",
    "BAD_DEREF_OFFS": "Invalid dereference offset",
    "DEREF_OPEN_BRACE": "Dereference brace is not closed",
    "COMM_CANT_DEREF": "$comm can not be dereferenced",
    "BAD_FETCH_ARG": "Invalid fetch argument",
    "ARRAY_NO_CLOSE": "Array is not closed",
    "BAD_ARRAY_SUFFIX": "Array has wrong suffix",
    "BAD_ARRAY_NUM": "Invalid array size",
    "ARRAY_TOO_BIG": "Array number is too big",
    "BAD_TYPE": "Unknown type is specified",
    "BAD_STRING": "String accepts only memory argument",
    "BAD_SYMSTRING": "Symbol String doesn't accept data/userdata",
    "BAD_BITFIELD": "Invalid bitfield",
    "ARG_NAME_TOO_LONG": "Argument name is too long",
    "NO_ARG_NAME": "Argument name is not specified",
    "BAD_ARG_NAME": "Argument name must follow the same rules as C identifiers",
    "USED_ARG_NAME": "This argument name is already used",
    "ARG_TOO_LONG": "Argument expression is too long",
    "NO_ARG_BODY": "No argument expression",
    "BAD_INSN_BNDRY": "Probe point is not an instruction boundary",
    "FAIL_REG_PROBE": "Failed to register probe event",
    "DIFF_PROBE_TYPE": "Probe type is different from existing probe",
    "DIFF_ARG_TYPE": "Argument type or name is different from existing probe",
    "SAME_PROBE": "There is already the exact same probe event",
    "NO_EVENT_INFO": "This requires both group and event name to attach",
    "BAD_ATTACH_EVENT": "Attached event does not exist",
    "BAD_ATTACH_ARG": "Attached event does not have this field",
    "NO_EP_FILTER": "No filter rule after 'if'",
}

#: Message text (as printed in error_log) -> error class name.
ERROR_CLASSES: dict[str, str] = {text: name for name, text in ERRORS.items()}
# Messages as older kernels spelled them -> class.
_OLD_MESSAGES: dict[str, str] = {"Invalid $-valiable specified": "BAD_VAR"}

# Error classes later kernels added, and messages they reworded (seen in 6.12's
# and 7.2's error_log).
LATER_ERRORS: dict[str, str] = {
    "NEED_STRING_TYPE": "$comm and immediate-string only accepts string type",
}
ERROR_CLASSES.update({text: name for name, text in LATER_ERRORS.items()})
_OLD_MESSAGES["Maxactive is only for function exit"] = "MAXACT_NO_KPROBE"


@dataclass(frozen=True)
class Grammar:
    """What one kernel accepts in kprobe_events: its version, arch and the config that matters.

    Each rule below was checked against the error_log of Debian's kernels (5.10, 6.1,
    6.12, 7.2 on x86_64 and arm64), kept in tests/unit/data/error_log/.
    """

    version: tuple[int, int] = (6, 1)
    arch: str = "x86_64"
    ibt: bool = False  # CONFIG_X86_KERNEL_IBT: functions start with endbr64
    btf_args: bool = False  # CONFIG_PROBE_EVENTS_BTF_ARGS: $arg*, arguments by name

    @property
    def symstr(self) -> bool:
        """':symstr' (6.2, in Debian's 6.1.y as a stable backport; 5.10 says BAD_TYPE)."""
        return self.version >= (6, 1)

    @property
    def char(self) -> bool:
        """':char' (6.5)."""
        return self.version >= (6, 5)

    @property
    def hyphen_groups(self) -> bool:
        """'-' in group names (a 6.1.y backport; 5.10 says BAD_GROUP_NAME)."""
        return self.version >= (6, 1)

    @property
    def args_on_return(self) -> bool:
        """$argN in a return probe (6.9: the entry's arguments are saved for the exit)."""
        return self.version >= (6, 9)

    @property
    def logs_string_type(self) -> bool:
        """'$comm:u8' logged as NEED_STRING_TYPE (6.8); before, -EINVAL with no log."""
        return self.version >= (6, 8)

    def entry_offset_max(self) -> int:
        """The largest SYM+offs that is still the function entry (arch_kprobe_on_func_entry()).

        x86 with IBT: +4, past endbr64 (6.2 on, Debian enables it from trixie's 6.12);
        otherwise, and always on arm64 (whose +4 is the ftrace call site), only +0.
        """
        return 4 if self.arch == "x86_64" and self.ibt else 0

    def message(self, error: str) -> str:
        if error == "MAXACT_NO_KPROBE" and self.version >= (6, 6):
            return "Maxactive is only for function exit"
        return ERRORS.get(error) or LATER_ERRORS[error]


# A sid kernel not built yet is taken as the newest known one.
NEWEST_KNOWN = (7, 2)


def grammar_for(
    kernel: str | None,
    arch: str = "x86_64",
    config: dict[str, str] | None = None,
    krel: str | None = None,
    use_image: bool = True,
) -> Grammar:
    """The grammar of KERNEL (a --kernel value) on ARCH.

    With CONFIG (a kernel .config) and KREL the kernel's own facts are used; without,
    the built image's (unless USE_IMAGE is False) when there is one, else the suite table's.
    """
    from kbridge import kernels

    arch_key = _ARCH_ALIASES.get(arch)
    if arch_key is None:
        raise KbridgeError(f"unknown arch {arch!r}", hint="use 'x86_64' or 'arm64'")
    suite = kernels.get(kernel)
    if config is None and use_image:
        config, krel = _image_config(suite.name, arch_key)
    if config is not None and krel is not None:
        return Grammar(
            kernels.version_tuple(krel),
            arch_key,
            ibt=config.get("CONFIG_X86_KERNEL_IBT") == "y",
            btf_args=config.get("CONFIG_PROBE_EVENTS_BTF_ARGS") == "y",
        )
    version = suite.major_minor or NEWEST_KNOWN
    # Debian turns both on from trixie (6.12); bullseye and bookworm have neither.
    newer = version >= (6, 12)
    return Grammar(version, arch_key, ibt=newer and arch_key == "x86_64", btf_args=newer)


def _image_config(suite: str, arch: str) -> tuple[dict[str, str] | None, str | None]:
    from kbridge.arch import get_arch
    from kbridge.images import image

    img = image.load(get_arch(arch), suite, verify=False)
    if img is None or not (cfg := img.headers / ".config").is_file():
        return None, None
    return _config_file(str(cfg), cfg.stat().st_mtime_ns), img.krel


@functools.lru_cache(maxsize=16)  # read for every line checked: parsed once per file version
def _config_file(path: str, mtime_ns: int) -> dict[str, str]:
    from pathlib import Path

    from kbridge.images import image

    return image.parse_config(Path(path).read_text())


# Register names accepted by regs_query_register_offset() (regoffset_table[]), per arch (arch.py).
REGISTERS: dict[str, frozenset[str]] = {a.name: a.tracefs_registers for a in ARCHES.values()}
_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "arm64": "arm64", "aarch64": "arm64"}

BASIC_TYPES = ("u8", "u16", "u32", "u64", "s8", "s16", "s32", "s64", "x8", "x16", "x32", "x64", "symbol")
STRING_TYPES = ("string", "ustring", "symstr")  # symstr: 6.1.y backport
# Field names a probe argument may not take (reserved_field_names[]).
RESERVED_FIELD_NAMES = frozenset(
    [
        "common_type",
        "common_flags",
        "common_preempt_count",
        "common_pid",
        "common_tgid",
        "__probe_ip",
        "__probe_ret_ip",
        "__probe_func",
    ]
)


# --- the model --------------------------------------------------------------


@dataclass(frozen=True)
class Reg:
    """``%REG``: a register, named as in the arch's regoffset_table."""

    name: str


@dataclass(frozen=True)
class Mem:
    """``@ADDR``: memory at a kernel address."""

    addr: int


@dataclass(frozen=True)
class SymMem:
    """``@SYM[+|-offs]``: memory at a data symbol plus offset."""

    sym: str
    offs: int = 0


@dataclass(frozen=True)
class Stack:
    """``$stackN``: the Nth stack entry."""

    n: int


@dataclass(frozen=True)
class StackPtr:
    """``$stack``: the stack address."""


@dataclass(frozen=True)
class Arg:
    """``$argN``: the Nth function argument (N >= 1), function entry only."""

    n: int


@dataclass(frozen=True)
class BtfArg:
    """``NAME``: a function argument by its name in BTF (CONFIG_PROBE_EVENTS_BTF_ARGS, 6.6).

    Whether the function has it is the kernel's to say (NO_BTFARG), not checked offline.
    """

    name: str


@dataclass(frozen=True)
class AllArgs:
    """``$arg*``: every argument, by their BTF names (6.6)."""


@dataclass(frozen=True)
class Retval:
    """``$retval``: the return value, return probes only."""


@dataclass(frozen=True)
class Comm:
    """``$comm`` (or ``$COMM``): the current task's comm, always a string."""


@dataclass(frozen=True)
class Imm:
    """``\\IMM``: an immediate number."""

    value: int


@dataclass(frozen=True)
class ImmStr:
    """``\\"text"``: an immediate string."""

    text: str


@dataclass(frozen=True)
class Deref:
    """``+|-[u]OFFS(FETCHARG)``: memory at inner + offset (``u``: user memory)."""

    offset: int
    inner: Fetch
    user: bool = False


Fetch = Union[Reg, Mem, SymMem, Stack, StackPtr, Arg, BtfArg, AllArgs, Retval, Comm, Imm, ImmStr, Deref]


@dataclass(frozen=True)
class Bitfield:
    """``b<width>@<offset>/<size>``: a bitfield in a ``size``-bit container."""

    width: int
    offset: int
    size: int


@dataclass(frozen=True)
class FetchArg:
    """One FETCHARG: ``[NAME=]FETCH[:TYPE[[N]]]``; None means "left out"."""

    fetch: Fetch
    name: str | None = None
    type: str | Bitfield | None = None
    array: int | None = None


@dataclass(frozen=True)
class ProbeEvent:
    """``p``/``r`` line.  Target is either symbol(+offset, module) or address.

    ``kind`` is "r" for any return probe, including ``p ... SYM%return``;
    ``return_suffix`` remembers that spelling so `format` can keep it.
    ``group``/``event`` are None when the line left them out.
    """

    kind: str
    maxactive: int | None = None
    group: str | None = None
    event: str | None = None
    symbol: str | None = None
    offset: int = 0
    module: str | None = None
    address: int | None = None
    args: tuple[FetchArg, ...] = ()
    return_suffix: bool = False

    @property
    def is_return(self) -> bool:
        return self.kind == "r"

    @property
    def effective_group(self) -> str:
        """The group the kernel will use."""
        return self.group if self.group is not None else DEFAULT_GROUP

    @property
    def effective_event(self) -> str:
        """The event name the kernel will use."""
        return self.event if self.event is not None else default_event_name(self)


@dataclass(frozen=True)
class RemoveEvent:
    """``-:[GRP/][EVENT] [PROBE [NAME=FETCHARG ...]]``.

    6.1's dyn_event_release() takes optional trailing words: they must match
    the probe point (``SYM+offs`` / address) and then the arguments as
    ``name=expr`` of the event to remove.  ``event`` None with a group means
    "every event of that group".
    """

    group: str | None
    event: str | None
    match: tuple[str, ...] = ()


Event = Union[ProbeEvent, RemoveEvent]


# --- errors -----------------------------------------------------------------


class EventSyntaxError(KbridgeError):
    """A line the kernel would reject, with the kernel's own verdict.

    ``error`` is the trace_probe.h class name (None when 6.1 rejects the line
    with -EINVAL but writes nothing to error_log), ``message`` its text,
    ``position`` the caret column in the original ``line``.  ``command`` and
    ``kernel_position`` are what error_log shows: the command re-joined with
    single spaces and the caret column in it.  ``position`` maps that column
    back onto ``line``: same word, same distance from the word's start.
    """

    def __init__(
        self,
        line: str,
        error: str | None,
        message: str,
        position: int | None = None,
        command: str | None = None,
        kernel_position: int | None = None,
    ) -> None:
        where = f" at column {position}" if position is not None else ""
        label = f" ({error})" if error else ""
        super().__init__(
            f"kprobe_events would reject {line!r}: {message}{label}{where}",
            hint="see Documentation/trace/kprobetrace.rst of that kernel",
        )
        self.message = message
        self.error = error
        self.line = line
        self.position = position
        self.command = command
        self.kernel_position = kernel_position

    def __str__(self) -> str:
        return str(self.args[0]) + f"\n  hint: {self.hint}"

    def caret(self) -> str:
        """The line and, under it, a ``^`` at the error position."""
        if self.position is None:
            return f"{self.line}\n"
        # Copy tabs so the caret lines up under tab-indented input too.
        pad = "".join(c if c == "\t" else " " for c in self.line[: self.position])
        return f"{self.line}\n{pad}{' ' * (self.position - len(pad))}^"

    def log_entry(self, timestamp: float = 0.0) -> ErrorLogEntry | None:
        """The error_log entry 6.1 would write for this line, if any."""
        if self.error is None or self.command is None or self.kernel_position is None:
            return None
        return ErrorLogEntry(timestamp, "trace_kprobe", self.message, self.command, self.kernel_position)


# --- error_log --------------------------------------------------------------

CMD_PREFIX = "  Command: "  # kernel/trace/trace.c


@dataclass(frozen=True)
class ErrorLogEntry:
    """One entry of tracing/error_log."""

    timestamp: float
    subsystem: str
    error: str
    command: str
    position: int

    @property
    def error_class(self) -> str | None:
        """The trace_probe.h class of ``error`` (None for other subsystems)."""
        return ERROR_CLASSES.get(self.error) or _OLD_MESSAGES.get(self.error)

    def __str__(self) -> str:
        # tracing_err_log_seq_show(): "[%5llu.%06u] %s%s" loc, text, then
        # "\n  Command: %s\n", then CMD_PREFIX-wide + pos spaces and "^".
        sec, usec = divmod(round(self.timestamp * 1_000_000), 1_000_000)
        return (
            f"[{sec:5d}.{usec:06d}] {self.subsystem}: error: {self.error}\n"
            f"{CMD_PREFIX}{self.command}\n"
            f"{' ' * (len(CMD_PREFIX) + self.position)}^\n"
        )


_LOG_HEAD = re.compile(r"\[\s*(\d+)\.(\d{6})\] (.+?): error: (.*)")


def parse_error_log(text: str) -> list[ErrorLogEntry]:
    """Parse the contents of tracing/error_log (6.1's tracing_log_err format)."""
    entries = []
    lines = text.splitlines()
    i = 0
    while i + 2 < len(lines):
        head = _LOG_HEAD.fullmatch(lines[i])
        if not (head and lines[i + 1].startswith(CMD_PREFIX) and lines[i + 2].endswith("^")):
            i += 1
            continue
        sec, usec, subsystem, error = head.groups()
        entries.append(
            ErrorLogEntry(
                timestamp=int(sec) + int(usec) / 1_000_000,
                subsystem=subsystem,
                error=error,
                command=lines[i + 1][len(CMD_PREFIX) :],
                position=len(lines[i + 2]) - 1 - len(CMD_PREFIX),
            )
        )
        i += 3
    return entries


# --- kstrtox.c, exactly -----------------------------------------------------

_U64 = (1 << 64) - 1


def _parse_integer(s: str, base: int) -> tuple[int, int, bool]:
    """lib/kstrtox.c _parse_integer_fixup_radix + _parse_integer: value, chars used (incl. 0x), overflow."""
    skip = 0
    if base == 0:
        base = 16 if s[:1] == "0" and s[1:2].lower() == "x" and _isxdigit(s[2:3]) else (8 if s[:1] == "0" else 10)
    if base == 16 and s[:1] == "0" and s[1:2].lower() == "x":
        skip = 2
    value, used, overflow = 0, 0, False
    for c in s[skip:]:
        digit = "0123456789abcdef".find(c.lower()) if c.isascii() else -1
        if digit < 0 or digit >= base:
            break
        value = value * base + digit
        overflow |= value > _U64
        used += 1
    return value & _U64, skip + used if used else 0, overflow


def _isxdigit(c: str) -> bool:
    return c != "" and c in "0123456789abcdefABCDEF"


def _isdigit(c: str) -> bool:
    return c != "" and c in "0123456789"


def _kstrtoull(s: str, base: int = 0) -> int | None:
    """kstrtoull(): None for -EINVAL/-ERANGE.  A leading '+' is allowed."""
    if s[:1] == "+":
        s = s[1:]
    return _strict(s, base)


def _strict(s: str, base: int) -> int | None:
    value, used, overflow = _parse_integer(s, base)
    rest = s[used:] if used else s
    if overflow or not used or rest not in ("", "\n"):
        return None
    return value


def _kstrtoll(s: str, base: int = 0) -> int | None:
    """kstrtoll()/kstrtol() on 64-bit."""
    if s[:1] == "-":
        v = _strict(s[1:], base)
        return None if v is None or v > 1 << 63 else -v
    v = _kstrtoull(s, base)
    return None if v is None or v >= 1 << 63 else v


def _kstrtouint(s: str, base: int = 0) -> int | None:
    v = _kstrtoull(s, base)
    return None if v is None or v > 0xFFFFFFFF else v


def _simple_strtoul(s: str) -> tuple[int, int]:
    """simple_strtoul(s, &end, 0): value and the number of chars consumed."""
    value, used, _ = _parse_integer(s, 0)
    return value, used


def _is_good_name(name: str, hyphen_ok: bool = False) -> bool:
    """__is_good_name(): C identifier; 6.1.y group names may also use '-'."""
    extra = "-" if hyphen_ok else ""
    return (
        bool(name)
        and name.isascii()
        and (name[0].isalpha() or name[0] in "_" + extra)
        and all(c.isalnum() or c in "_" + extra for c in name[1:])
    )


# --- parsing ----------------------------------------------------------------

_WORD = re.compile(r"[^ \t\n\v\f\r]+")  # argv_split() splits on isspace()
_TOKENS = tuple[tuple[int, str], ...]


def parse(line: str, arch: str = "x86_64", kernel: str | Grammar | None = None) -> Event:
    """Parse one kprobe_events line as KERNEL would, or raise EventSyntaxError.

    ``arch`` ("x86_64" or "arm64") selects the register names; ``kernel`` is a
    --kernel value (default bookworm's 6.1) or a Grammar.  A ``#`` comment is
    dropped first, as trace_parse_run_command() does.
    """
    grammar = kernel if isinstance(kernel, Grammar) else grammar_for(kernel, arch)
    arch_key = grammar.arch
    text = line.split("#", 1)[0]
    if (col := next((i for i, c in enumerate(text) if not c.isascii()), None)) is not None:
        # The kernel reads the line as bytes and its isspace() (lib/ctype.c) counts 0xA0 as a
        # space: a non-ASCII character (U+00A0 is C2 A0 in UTF-8) does not mean what it shows.
        raise EventSyntaxError(
            line,
            None,
            f"non-ASCII character {text[col]!r}: the kernel splits "
            "kprobe_events words at byte 0xA0 and names are ASCII",
            col,
        )
    words = tuple((m.start(), m.group()) for m in _WORD.finditer(text))
    # create_or_delete_trace_kprobe() looks at the raw first byte, before
    # argv_split(): " -:foo" is not a removal (and is then rejected).
    if text.startswith("-"):
        return _parse_remove(line, words)
    return _ProbeParser(line, words, arch_key, grammar).parse()


def _unlogged(line: str, why: str) -> NoReturn:
    raise EventSyntaxError(line, None, why)


def _parse_remove(line: str, words: _TOKENS) -> RemoveEvent:
    """dyn_event_release(): no error_log entries, only -EINVAL."""
    head = words[0][1]
    if head[1:2] != ":":
        _unlogged(line, "a removal must start with '-:' (-EINVAL, nothing logged)")
    group: str | None
    group, slash, event = head[2:].partition("/")
    if not slash:
        group, event = None, head[2:]
        if not event:
            _unlogged(line, "'-:' needs an event or 'GROUP/' (-EINVAL, nothing logged)")
    return RemoveEvent(group, event or None, tuple(w for _, w in words[1:]))


class _ProbeParser:
    """Mirror of __trace_kprobe_create() and the trace_probe.c helpers it calls.

    ``index`` is trace_probe_log.index: which argv word error offsets are
    relative to, exactly as trace_probe_log_set_index() sets it.
    """

    def __init__(self, line: str, words: _TOKENS, arch: str, grammar: Grammar) -> None:
        self.grammar = grammar
        self.line = line
        self.starts = [start for start, _ in words]
        self.argv = [word for _, word in words]
        self.registers = REGISTERS[arch]
        self.arch = arch
        self.index = 0
        self.flags_return = False
        self.flags_fentry = False
        self.register_errors: list[str] = []  # from @SYM, raised at registration

    def fail(self, offset: int, error: str) -> NoReturn:
        """__trace_probe_log_err(): caret = offset of argv[index] in the joined command + offset."""
        command = " ".join(self.argv)
        joined = [sum(len(w) + 1 for w in self.argv[:i]) for i in range(len(self.argv))]
        # Past the last word the kernel points "next to the last arg + space".
        kpos = joined[self.index] + offset if self.index < len(self.argv) else len(command) + 1
        word = max(i for i, j in enumerate(joined) if j <= kpos)
        position = self.starts[word] + kpos - joined[word]
        raise EventSyntaxError(self.line, error, self.grammar.message(error), position, command, kpos)

    # -- the command head -----------------------------------------------------

    def parse(self) -> ProbeEvent:
        argv = self.argv
        if not argv:
            _unlogged(self.line, "empty command (the kernel ignores it)")
        head = argv[0]
        if head[0] not in "pr":
            _unlogged(self.line, f"{head[0]!r} is not a kprobe command (-EINVAL, nothing logged)")
        if len(argv) < 2:
            _unlogged(self.line, "no probe point given (-EINVAL, nothing logged)")
        kind = head[0]
        colon = head.find(":", 1)
        maxactive = self._maxactive(kind, head, colon)
        # Anything else between p/r and ':' (e.g. "pfoo:") is ignored by 6.1.
        target = self._target(kind)
        self.index = 0
        group, event = (None, None) if colon < 0 else self._event_name(head[colon + 1 :], colon + 1)
        probe = ProbeEvent(
            kind="r" if target.pop("is_return") else "p", maxactive=maxactive, group=group, event=event, **target
        )
        args = self._args()
        self._check_symbols_at_register(probe)
        return replace(probe, args=args)

    def _maxactive(self, kind: str, head: str, colon: int) -> int | None:
        if not _isdigit(head[1:2]):
            return None
        if kind != "r":
            self.fail(1, "MAXACT_NO_KPROBE")
        digits = head[1:colon] if colon >= 0 else head[1:]
        value = _kstrtouint(digits) if len(digits) <= MAX_EVENT_NAME_LEN - 1 else None
        if not value:  # 6.1 rejects 0 although kprobetrace.rst calls it "the default"
            self.fail(1, "BAD_MAXACT")
        if value > KRETPROBE_MAXACTIVE_MAX:
            self.fail(1, "MAXACT_TOO_BIG")
        return value

    def _target(self, kind: str) -> dict:
        """The probe point: MEMADDR, or [MOD:]SYM[+offs][%return]."""
        spec = self.argv[1]
        address = _kstrtoull(spec)
        if address is not None:
            # Note: only the symbol branch sets TPARG_FL_RETURN, so 6.1 refuses
            # $retval on "r ADDR" (RETVAL_ON_PROBE) and $argN on any ADDR.
            return {"address": address, "is_return": kind == "r"}
        self.index = 1
        if "/" in spec and ":" in spec:
            _unlogged(self.line, "this looks like a uprobe (-EINVAL, nothing logged)")
        symbol, suffix = spec, False
        pct = symbol.find("%")
        if pct >= 0:
            if symbol[pct:] != "%return":
                self.fail(pct, "BAD_ADDR_SUFFIX")
            symbol, suffix = symbol[:pct], True
        is_return = kind == "r" or suffix
        symbol, offset = self._split_symbol_offset(symbol)
        module, colon, name = symbol.partition(":") if ":" in symbol else ("", "", symbol)
        if not colon and (not name or _isdigit(name[0])):
            # Can't be a kernel symbol: number_of_same_symbols() finds 0.
            self.fail(0, "BAD_PROBE_ADDR")
        # kprobe_on_func_entry(): +0, or up to +4 on x86 IBT kernels (past endbr64).
        on_entry = offset <= self.grammar.entry_offset_max()
        if is_return and not on_entry:
            self.fail(0, "BAD_RETPROBE")
        self.flags_return, self.flags_fentry = is_return, on_entry
        return {
            "symbol": name,
            "module": module if colon else None,
            "offset": offset,
            "return_suffix": suffix,
            "is_return": is_return,
        }

    def _split_symbol_offset(self, symbol: str) -> tuple[str, int]:
        """traceprobe_split_symbol_offset() plus the range check around it."""
        cut = min((i for i in (symbol.find("+"), symbol.find("-")) if i >= 0), default=-1)
        if cut < 0:
            return symbol, 0
        offset = _kstrtoll(symbol[cut:])
        if offset is None or not 0 <= offset <= 0xFFFFFFFF:
            self.fail(0, "BAD_PROBE_ADDR")
        return symbol[:cut], offset

    def _event_name(self, text: str, offset: int) -> tuple[str | None, str | None]:
        """traceprobe_parse_event_name(); '.' also separates GRP.EVENT in 6.1.y."""
        slash = text.find("/")
        if slash < 0:
            slash = text.find(".")
        group = None
        if slash >= 0:
            if slash == 0:
                self.fail(offset, "NO_GROUP_NAME")
            if slash + 1 > MAX_EVENT_NAME_LEN:
                self.fail(offset, "GROUP_TOO_LONG")
            group = text[:slash]
            if not _is_good_name(group, hyphen_ok=self.grammar.hyphen_groups):
                self.fail(offset, "BAD_GROUP_NAME")
            offset += slash + 1
            text = text[slash + 1 :]
        if not text:
            if group is None:
                self.fail(offset, "NO_EVENT_NAME")
            return group, None
        if len(text) >= MAX_EVENT_NAME_LEN:
            self.fail(offset, "EVENT_TOO_LONG")
        if not _is_good_name(text):
            self.fail(offset, "BAD_EVENT_NAME")
        return group, text

    # -- arguments -------------------------------------------------------------

    def _args(self) -> tuple[FetchArg, ...]:
        names: list[str] = []
        args = []
        # 6.1 parses at most MAX_TRACE_ARGS and silently drops the rest
        # (newer kernels log TOO_MANY_ARGS instead).
        for i, word in enumerate(self.argv[2 : 2 + MAX_TRACE_ARGS]):
            self.index = i + 2
            args.append(self._arg(word, i, names))
        return tuple(args)

    def _arg(self, word: str, i: int, names: list[str]) -> FetchArg:
        """traceprobe_parse_probe_arg(): NAME=, then the body."""
        eq = word.find("=")
        if eq >= 0:
            if eq > MAX_ARG_NAME_LEN:
                self.fail(0, "ARG_NAME_TOO_LONG")
            if eq == 0:
                self.fail(0, "NO_ARG_NAME")
            name, body, start = word[:eq], word[eq + 1 :], eq + 1
        else:
            name, body, start = f"arg{i + 1}", word, 0
        if not _is_good_name(name):
            self.fail(0, "BAD_ARG_NAME")
        # Auto names count too: "arg2=%ax %bx" clashes on the second arg.
        if name in RESERVED_FIELD_NAMES or name in names:
            self.fail(0, "USED_ARG_NAME")
        names.append(name)
        arg = self._body(body, start)
        return FetchArg(arg.fetch, name if eq >= 0 else None, arg.type, arg.array)

    def _body(self, body: str, offset: int) -> FetchArg:
        """traceprobe_parse_probe_arg_body(): type, array, fetch, store ops."""
        if len(body) > MAX_ARGSTR_LEN:
            self.fail(offset, "ARG_TOO_LONG")
        if not body:
            self.fail(offset, "NO_ARG_BODY")
        expr, colon, after = body.partition(":")
        tpos = len(expr) + 1 if colon else 0  # "t - arg" in the kernel
        type_text: str | None = after if colon else None
        count = None
        if type_text is not None and "[" in type_text:
            type_text, count = self._array(type_text, offset + tpos)
        if expr in ("$comm", "$COMM") or expr.startswith('\\"'):
            if count is not None or type_text not in (None, "string"):
                # 5.10 and 6.1 return -EINVAL here without logging; 6.8 logs
                # NEED_STRING_TYPE ("tracing/probes: Fix to show a parse error
                # for bad type for $comm"), with the caret on the type.
                if self.grammar.logs_string_type:
                    self.fail(offset + tpos, "NEED_STRING_TYPE")
                _unlogged(self.line, "$comm and immediate strings only take ':string' (-EINVAL, nothing logged by 6.1)")
            type_: str | Bitfield | None = type_text
            kind = "string"
        else:
            type_ = self._fetch_type(type_text, offset + tpos)
            kind = type_text or "x64"
        fetch, code = self._fetch(expr, offset, 0)
        store, code = self._store(fetch, kind, count, code, offset, tpos)
        if isinstance(type_, Bitfield):
            code = self._check_bitfield(type_, code, offset + tpos)
        if count is not None:
            if store not in ("ST_MEM", "ST_STRING", "ST_USTRING"):
                self.fail(offset + tpos, "BAD_STRING")
            code = self._next(code, offset, "TOO_MANY_OPS")
        return FetchArg(fetch, None, type_, count)

    def _array(self, type_text: str, tpos: int) -> tuple[str, int]:
        """TYPE[N]: returns TYPE and N."""
        type_text, _, rest = type_text.partition("[")
        t2 = tpos + len(type_text) + 1
        close = rest.find("]")
        if close < 0:
            self.fail(t2 + len(rest), "ARRAY_NO_CLOSE")
        if close + 1 < len(rest):
            self.fail(t2 + close + 1, "BAD_ARRAY_SUFFIX")
        count = _kstrtouint(rest[:close])
        if not count:
            self.fail(t2, "BAD_ARRAY_NUM")
        if count > MAX_ARRAY_LEN:
            self.fail(t2, "ARRAY_TOO_BIG")
        return type_text, count

    def _fetch_type(self, text: str | None, pos: int) -> str | Bitfield | None:
        """find_fetch_type(); bitfield syntax proper is checked after the fetch."""
        if text is None:
            return None
        if text.startswith("b"):
            size = _kstrtoull(text.partition("/")[2]) if "/" in text else None
            if size not in (8, 16, 32, 64):
                self.fail(pos, "BAD_TYPE")
            width, used = _simple_strtoul(text[1:])
            rest = text[1 + used :]
            bit_offset, used2 = _simple_strtoul(rest[1:])
            if width == 0 or rest[:1] != "@" or used2 == 0 or rest[1 + used2 : 2 + used2] != "/":
                return Bitfield(0, 0, size)  # invalid: reported as BAD_BITFIELD later
            return Bitfield(width, bit_offset, size)
        if (
            text not in BASIC_TYPES + STRING_TYPES + ("char",)
            or (text == "symstr" and not self.grammar.symstr)
            or (text == "char" and not self.grammar.char)
        ):
            self.fail(pos, "BAD_TYPE")
        return text

    def _check_bitfield(self, bf: Bitfield, code: int, pos: int) -> int:
        """__parse_bitfield_probe_arg()."""
        if bf.width == 0:
            self.fail(pos, "BAD_BITFIELD")
        code = self._next(code, pos, "BAD_BITFIELD")
        if bf.size < bf.width + bf.offset:
            self.fail(pos, "BAD_BITFIELD")
        return code

    def _store(self, fetch: Fetch, kind: str, count: int | None, code: int, offset: int, tpos: int) -> tuple[str, int]:
        """The store op of traceprobe_parse_probe_arg_body(), with its checks."""
        user = isinstance(fetch, Deref) and fetch.user
        deref = isinstance(fetch, (Deref, Mem, SymMem))
        if kind == "symstr":
            if not (isinstance(fetch, (Reg, Stack, Retval, Arg)) or (deref and not user)):
                self.fail(offset + tpos, "BAD_SYMSTRING")
        elif kind in STRING_TYPES and not (deref or isinstance(fetch, (Imm, Comm, ImmStr))):
            self.fail(offset + tpos, "BAD_STRING")
        if kind in STRING_TYPES:
            if kind == "symstr" or isinstance(fetch, (Imm, Comm, ImmStr)) or count:
                code = self._next(code, offset, "TOO_MANY_OPS")
            if kind == "ustring" or user:
                return "ST_USTRING", code
            return ("ST_SYMSTR" if kind == "symstr" else "ST_STRING"), code
        if deref:
            return ("ST_UMEM" if user else "ST_MEM"), code
        return "ST_RAW", self._next(code, offset, "TOO_MANY_OPS")

    def _next(self, code: int, pos: int, error: str) -> int:
        """Take the next fetch_insn slot; slot FETCH_INSN_MAX-1 is reserved for END."""
        code += 1
        if code == FETCH_INSN_MAX - 1:
            self.fail(pos, error)
        return code

    def _fetch(self, arg: str, offs: int, code: int) -> tuple[Fetch, int]:
        """parse_probe_arg(): the fetch tree and the last fetch_insn slot used."""
        first = arg[:1]
        if first == "$":
            return self._var(arg[1:], offs), code
        if first == "%":
            if arg[1:] not in self.registers:
                self.fail(offs, "BAD_REG_NAME")
            return Reg(arg[1:]), code
        if first == "@":
            return self._memory(arg, offs, code)
        if first in ("+", "-"):
            return self._deref(arg, offs, code)
        if first == "\\":
            return self._immediate(arg, offs), code
        if self.grammar.btf_args and self.flags_fentry and re.fullmatch(r"[A-Za-z_]\w*", arg):
            return BtfArg(arg), code  # 6.6: an argument by name; the kernel checks BTF
        self.fail(offs, "BAD_FETCH_ARG")

    def _var(self, var: str, offs: int) -> Fetch:
        """parse_probe_vars()."""
        if var == "retval":
            if not self.flags_return:
                self.fail(offs, "RETVAL_ON_PROBE")
            return Retval()
        if var.startswith("stack"):
            rest = var[5:]
            if not rest:
                return StackPtr()
            n = _kstrtoull(rest, 10) if _isdigit(rest[0]) else None
            if n is None:
                self.fail(offs, "BAD_VAR")
            if n > PARAM_MAX_STACK:
                self.fail(offs, "BAD_STACK_NUM")
            return Stack(n)
        if var in ("comm", "COMM"):
            return Comm()
        # $argN needs flags == KERNEL|FENTRY: symbol at function entry and not
        # a return probe (6.1 has no $argN on kretprobes or addresses).
        if self.grammar.btf_args and var == "arg*" and self.flags_fentry:
            return AllArgs()
        # 6.9 saves the entry's arguments for the return handler, so $argN works there too.
        if self.flags_fentry and (not self.flags_return or self.grammar.args_on_return) and var.startswith("arg"):
            n = _kstrtoull(var[3:], 10)
            if n is None:
                self.fail(offs, "BAD_VAR")
            if not n or n > PARAM_MAX_STACK:
                self.fail(offs, "BAD_ARG_NUM")
            return Arg(n)
        self.fail(offs, "BAD_VAR")

    def _memory(self, arg: str, offs: int, code: int) -> tuple[Fetch, int]:
        """'@' case: @ADDR, @+FILEOFFS (uprobes only), @SYM[+|-offs]."""
        if _isdigit(arg[1:2]):
            addr = _kstrtoull(arg[1:])
            if addr is None:
                self.fail(offs, "BAD_MEM_ADDR")
            fetch: Fetch = Mem(addr)
        elif arg[1:2] == "+":
            self.fail(offs, "FILE_ON_KPROBE")
        else:
            fetch = self._symbol_memory(arg[1:])
            code = self._next(code, offs, "TOO_MANY_OPS")  # NOP_SYMBOL, then IMM
        return fetch, self._next(code, offs, "TOO_MANY_OPS")  # then DEREF

    def _symbol_memory(self, text: str) -> SymMem:
        """@SYM[+|-offs] stays text until registration (traceprobe_update_arg())."""
        cut = min((i for i in (text.find("+"), text.find("-")) if i >= 0), default=-1)
        sym, offs = (text, 0) if cut < 0 else (text[:cut], _kstrtoll(text[cut:]))
        if offs is None:
            self.register_errors.append("FAIL_REG_PROBE")  # kstrtol(): -EINVAL
        elif not sym:
            self.register_errors.append("BAD_PROBE_ADDR")  # no symbol "": -ENOENT
        return SymMem(sym, offs or 0)

    def _deref(self, arg: str, offs: int, code: int) -> tuple[Fetch, int]:
        """'+'/'-' case, including the kernel's own caret arithmetic."""
        user = arg[1:2] == "u"
        if user:
            arg = arg[0] + arg[2:]
        if arg[0] == "+":
            arg = arg[1:]
        brace = arg.find("(")
        if brace < 0:
            self.fail(offs, "DEREF_NEED_BRACE")
        offset = _kstrtoll(arg[:brace])
        if offset is None:
            self.fail(offs, "BAD_DEREF_OFFS")
        # offs += (tmp + 1 - arg) + (arg[0] != '-' ? 1 : 0); note that this is
        # one short for "+u"/"-u" derefs, and the kernel's caret is too.
        offs += brace + 1 + (arg[0] != "-")
        inner = arg[brace + 1 :]
        close = inner.rfind(")")
        if close < 0:
            self.fail(offs + len(inner), "DEREF_OPEN_BRACE")
        # Text after the last ')' is silently dropped by 6.1.
        fetch, code = self._fetch(inner[:close], offs, code)
        if isinstance(fetch, (Comm, ImmStr)):
            self.fail(offs, "COMM_CANT_DEREF")
        code = self._next(code, offs, "TOO_MANY_OPS")
        return Deref(offset, fetch, user), code

    def _immediate(self, arg: str, offs: int) -> Fetch:
        r"""'\' case: \"string" or \IMM (str_to_immediate())."""
        if arg[1:2] == '"':
            text = arg[2:]
            # The kernel tests str[len - 1]; for `\"` alone that byte is the
            # opening quote itself, so 6.1 accepts it as an empty string.
            if text == "":
                return ImmStr("")
            if not text.endswith('"'):
                self.fail(offs + 2 + len(text), "IMMSTR_NO_CLOSE")
            return ImmStr(text[:-1])
        num = arg[1:]
        if _isdigit(num[:1]):
            value = _kstrtoull(num)
        elif num[:1] == "-":
            value = _kstrtoll(num)
        elif num[:1] == "+":
            value = _kstrtoll(num[1:])
        else:
            value = None
        if value is None:
            self.fail(offs + 1, "BAD_IMM")
        return Imm(value)

    # -- registration-time checks that need no kernel ----------------------------

    def _check_symbols_at_register(self, probe: ProbeEvent) -> None:
        """traceprobe_update_arg() resolves @SYM when registering; errors land on argv[1].

        -ENOENT is forgiven (the probe waits) when the target is a MOD:SYM or
        an address, see trace_kprobe_module_exist(); only a plain SYM fails.
        """
        self.index = 1
        for error in self.register_errors:
            if error == "FAIL_REG_PROBE" or (probe.symbol is not None and probe.module is None):
                self.fail(0, error)


# --- formatting -------------------------------------------------------------


def format(ev: Event) -> str:  # noqa: A001 - the name the API promises
    """Write an event back as a kprobe_events line (single spaces)."""
    if isinstance(ev, RemoveEvent):
        name = (f"{ev.group}/" if ev.group is not None else "") + (ev.event or "")
        return " ".join([f"-:{name}", *ev.match])
    return " ".join([_format_head(ev), _format_target(ev), *map(format_arg, ev.args)])


def _format_head(ev: ProbeEvent) -> str:
    letter = "p" if ev.return_suffix and ev.maxactive is None else ev.kind
    head = letter + (str(ev.maxactive) if ev.maxactive is not None else "")
    if ev.group is None and ev.event is None:
        return head
    return f"{head}:" + (f"{ev.group}/" if ev.group is not None else "") + (ev.event or "")


def _format_target(ev: ProbeEvent) -> str:
    if ev.address is not None:
        return f"0x{ev.address:x}"
    target = (f"{ev.module}:" if ev.module is not None else "") + (ev.symbol or "")
    if ev.offset:
        target += f"+{ev.offset}"
    return target + ("%return" if ev.return_suffix else "")


def format_arg(arg: FetchArg) -> str:
    """One FETCHARG as written on the command line."""
    text = (f"{arg.name}=" if arg.name is not None else "") + format_fetch(arg.fetch)
    if isinstance(arg.type, Bitfield):
        text += f":b{arg.type.width}@{arg.type.offset}/{arg.type.size}"
    elif arg.type is not None:
        text += f":{arg.type}"
    return text + (f"[{arg.array}]" if arg.array is not None else "")


def format_fetch(fetch: Fetch) -> str:
    """A fetch expression tree as text."""
    match fetch:
        case Reg(name):
            return f"%{name}"
        case Mem(addr):
            return f"@0x{addr:x}"
        case SymMem(sym, 0):
            return f"@{sym}"
        case SymMem(sym, offs):
            return f"@{sym}{offs:+d}"
        case Stack(n):
            return f"$stack{n}"
        case StackPtr():
            return "$stack"
        case Arg(n):
            return f"$arg{n}"
        case BtfArg(name):
            return name
        case AllArgs():
            return "$arg*"
        case Retval():
            return "$retval"
        case Comm():
            return "$comm"
        case Imm(value):
            return f"\\{value}"
        case ImmStr(text):
            return f'\\"{text}"'
        case Deref(offset, inner, user):
            sign = "-" if offset < 0 else "+"
            return f"{sign}{'u' if user else ''}{abs(offset)}({format_fetch(inner)})"
    raise TypeError(f"not a fetch expression: {fetch!r}")


def default_event_name(ev: ProbeEvent) -> str:
    """The event name 6.1 generates when the line gives none.

    "%c_%s_%ld" of p/r, [MOD:]SYM and offset, or "%c_0x%p" of the address,
    cut to MAX_EVENT_NAME_LEN - 1, then sanitize_event_name() turns ':' and
    '.' (except in the first character) into '_'.  For addresses the kernel
    prints a *hashed* %p unless booted with no_hash_pointers; this returns
    the unhashed form.
    """
    letter = "r" if ev.is_return else "p"
    if ev.address is not None:
        name = f"{letter}_0x{ev.address:016x}"
    else:
        sym = (f"{ev.module}:" if ev.module is not None else "") + (ev.symbol or "")
        name = f"{letter}_{sym}_{ev.offset}"
    name = name[: MAX_EVENT_NAME_LEN - 1]
    return name[:1] + name[1:].replace(":", "_").replace(".", "_")
