"""format(): an event of the model written back as a kprobe_events line."""

from __future__ import annotations

from kbridge.kprobe_events.model import (
    AllArgs,
    Arg,
    Bitfield,
    BtfArg,
    Comm,
    Deref,
    Event,
    Fetch,
    FetchArg,
    Imm,
    ImmStr,
    Mem,
    ProbeEvent,
    Reg,
    RemoveEvent,
    Retval,
    Stack,
    StackPtr,
    SymMem,
)


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
