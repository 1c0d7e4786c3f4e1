"""ProbeSpec <-> kprobe_events lines, built with and checked by kbridge.kprobe_events.

A spec becomes at most two events in the ``kbridge`` group:

* ``p:kbridge/<sym>_p SYM[+off] name=FETCH:u64 ...`` for --pre, --post and
  --entry.  tracefs has no post-handler: a kprobe event records at the point
  the pre-handler runs, so --post (and --entry, which a kretprobe runs at
  function entry) are served by the same ``p`` event.
* ``r[MAXACTIVE]:kbridge/<sym>_r SYM ret=$retval:s64`` for --ret.  6.1 has no
  $argN on return probes, so arguments are reported by the ``p`` event.

Arguments are fetched by position (``$argN``, what regs_get_kernel_argument()
reads; on 32-bit arm, which has neither, ``%r0``-``%r3`` then ``$stackN``), as u64,
which is how the kbridge module prints them (%lu).  A syscall
entry wrapper (``__x64_sys_*``, ``__arm64_sys_*``) takes one argument, the
user's pt_regs, so the syscall's own arguments are read through it at the
offsets of struct pt_regs (x86_64: the syscall ABI's di, si, dx, r10, r8, r9;
arm64: regs[0..5]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kbridge import debuginfo, kprobe_events
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.kprobe_events import Grammar, grammar_for
from kbridge.kprobe_events.grammar import MAX_EVENT_NAME_LEN
from kbridge.spec import ProbeSpec

GROUP = "kbridge"
# The registers a kprobe event records for --pre/--post/--entry, as the module's handlers
# print them: the instruction pointer and the flags register (x86_64 %ip %flags, arm64 %pc %pstate,
# arm %pc %cpsr).
IP_ARG, FLAGS_ARG = "kb_ip", "kb_flags"


@dataclass(frozen=True)
class RenderedEvent:
    """One kprobe_events line for a spec, and which handlers it serves."""

    line: str
    event: kprobe_events.ProbeEvent
    handlers: tuple[str, ...]

    @property
    def full_name(self) -> str:
        return f"{self.event.effective_group}/{self.event.effective_event}"


def event_stem(symbol: str) -> str:
    """A C identifier from SYMBOL (clone suffixes such as .isra.0 become _isra_0)."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", symbol)
    return stem[: MAX_EVENT_NAME_LEN - 3]  # room for "_p"/"_r"


def fetch_for(arg_index: int, symbol: str, arch: Arch) -> kprobe_events.Fetch:
    """How to fetch the ARG_INDEX-th (1-based) argument of SYMBOL at its entry."""
    if arch.is_syscall_wrapper(symbol):
        offsets = arch.syscall_arg_offsets
        if not 1 <= arg_index <= len(offsets):
            raise KbridgeError(
                f"{symbol} is a syscall: it has at most {len(offsets)} arguments, not argument {arg_index}"
            )
        return kprobe_events.Deref(offsets[arg_index - 1], kprobe_events.Arg(1))
    if not arch.arg_access_api:
        # No $argN (32-bit arm): the registers of the calling convention, then the stack slots
        # at the function's entry ($stack0 is the first argument passed on the stack).
        regs = arch.arg_registers
        if arg_index <= len(regs):
            return kprobe_events.Reg(regs[arg_index - 1])
        return kprobe_events.Stack(arg_index - 1 - len(regs))
    return kprobe_events.Arg(arg_index)


def render(spec: ProbeSpec, arch: Arch, grammar: Grammar | None = None, group: str = GROUP) -> list[RenderedEvent]:
    """The kprobe_events lines for SPEC (whose symbol is already resolved) on ARCH, checked in GRAMMAR."""
    grammar = grammar or grammar_for(None, arch)
    stem = event_stem(spec.symbol)
    out: list[RenderedEvent] = []
    entry_handlers = tuple(h for h in ("pre", "post", "entry") if h in spec.handlers)
    if entry_handlers:
        args = tuple(kprobe_events.FetchArg(fetch_for(a.index, spec.symbol, arch), a.name, "u64") for a in spec.args)
        args += (
            kprobe_events.FetchArg(kprobe_events.Reg(arch.ip_register), IP_ARG, "x64"),
            kprobe_events.FetchArg(kprobe_events.Reg(arch.flags_register), FLAGS_ARG, "x64"),
        )
        ev = kprobe_events.ProbeEvent(
            "p", group=group, event=f"{stem}_p", symbol=spec.symbol, offset=spec.offset, args=args
        )
        out.append(_checked(ev, grammar, entry_handlers))
    if "ret" in spec.handlers:
        ev = kprobe_events.ProbeEvent(
            "r",
            maxactive=spec.maxactive or None,
            group=group,
            event=f"{stem}_r",
            symbol=spec.symbol,
            args=(kprobe_events.FetchArg(kprobe_events.Retval(), "ret", "s64"),),
        )
        out.append(_checked(ev, grammar, ("ret",)))
    return out


def _checked(ev: kprobe_events.ProbeEvent, grammar: Grammar, handlers: tuple[str, ...]) -> RenderedEvent:
    line = kprobe_events.format(ev)
    parsed = kprobe_events.parse(line, grammar)  # raises EventSyntaxError with the kernel's verdict
    assert isinstance(parsed, kprobe_events.ProbeEvent)
    return RenderedEvent(line, parsed, handlers)


def spec_notes(spec: ProbeSpec) -> list[str]:
    """What the tracefs rendering of SPEC does differently from the module."""
    notes = []
    if "post" in spec.handlers:
        notes.append(
            "tracefs has no post-handler: --post is reported by the kprobe event, "
            "which records before the probed instruction (like --pre)"
        )
    if "entry" in spec.handlers:
        notes.append("--entry is reported by a kprobe event at the function entry (6.1 has no $argN on return probes)")
    return notes


def removal_line(ev: kprobe_events.ProbeEvent) -> str:
    """The ``-:GRP/EVENT`` line that removes EV."""
    return kprobe_events.format(kprobe_events.RemoveEvent(ev.effective_group, ev.effective_event))


def check_lines(lines: list[str], grammar: Grammar) -> list[kprobe_events.ProbeEvent]:
    """Parse LINES offline as GRAMMAR's kernel would; only probe definitions are accepted.

    Raises EventSyntaxError (the kernel's verdict and caret) for a bad line and
    KbridgeError for removals or two lines defining the same event.
    """
    parsed: list[kprobe_events.ProbeEvent] = []
    seen: dict[str, tuple[str, str]] = {}  # event name -> (GROUP/EVENT, line)
    for line in lines:
        ev = kprobe_events.parse(line, grammar)
        if dropped := kprobe_events.dropped_args(line):
            raise KbridgeError(
                f"{line[:60]!r}... has {dropped} arguments more than the kernel's limit of "
                f"{kprobe_events.MAX_TRACE_ARGS}: it would record the first {kprobe_events.MAX_TRACE_ARGS} "
                "and drop the rest without a word",
                "split the arguments over several events",
            )
        if isinstance(ev, kprobe_events.RemoveEvent):
            raise KbridgeError(
                f"{line!r} removes an event: kbridge trace defines its events and removes them itself when done",
                "give only p: and r: lines",
            )
        name = f"{ev.effective_group}/{ev.effective_event}"
        if ev.effective_event in seen:
            other, before = seen[ev.effective_event]
            if other == name:
                raise KbridgeError(
                    f"{line!r} defines {name}, already defined by {before!r}",
                    "give each line its own name: p:GROUP/NAME ...",
                )
            # trace_pipe and kprobe_profile name an event without its group: two events of
            # one name in different groups would be counted as each other.
            raise KbridgeError(
                f"{line!r} defines {name} and {before!r} defines {other}: trace_pipe prints "
                f"both as {ev.effective_event!r}, so their hits could not be told apart",
                "give each event its own name: p:GROUP/NAME ...",
            )
        seen[ev.effective_event] = (name, line)
        parsed.append(ev)
    return parsed


def btf_names(ev: kprobe_events.ProbeEvent) -> list[str]:
    """The arguments EV names by BTF (NAME, $arg*, NAME->field): the kernel looks them up in the
    BTF of the probed function's object, vmlinux's or its module's."""

    def named(fetch: kprobe_events.Fetch) -> str | None:
        if isinstance(fetch, kprobe_events.Deref):
            return named(fetch.inner)
        if isinstance(fetch, kprobe_events.BtfArg):
            return fetch.name
        return "$arg*" if isinstance(fetch, kprobe_events.AllArgs) else None

    return [n for a in ev.args if (n := named(a.fetch)) is not None]


def no_btf(ev: kprobe_events.ProbeEvent, module: str, why: str) -> KbridgeError:
    """The refusal of BTF argument names on a function of MODULE, which has no BTF (WHY)."""
    names = btf_names(ev)
    return KbridgeError(
        f"{ev.effective_event}: {', '.join(names)} names an argument by BTF, and module {module} has none "
        f"({why}): the kernel would answer 'No BTF entry for this probe point'",
        "fetch the arguments by position instead: $arg1, $arg2, ... (with a type, e.g. count=$arg3:u64)",
    )


def refuse_btf_on_built_modules(parsed: list[kprobe_events.ProbeEvent], arch: Arch) -> None:
    """Offline: BTF names on MOD:SYM where MOD is a module kbridge builds (out-of-tree, without BTF)."""
    for ev in parsed:
        if ev.module and btf_names(ev) and debuginfo.built_for(ev.module, arch.name):
            raise no_btf(
                ev,
                ev.module,
                "kbridge builds out-of-tree modules without BTF: pahole needs the kernel's vmlinux, "
                "which Debian's headers do not ship",
            )
