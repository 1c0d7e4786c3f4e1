"""format(): an event of the model written back as a kprobe_events line."""

from __future__ import annotations

from kbridge.kprobe_events import model as m


def format(ev: m.Event) -> str:  # noqa: A001 - the name the API promises
    """Write an event back as a kprobe_events line (single spaces)."""
    if isinstance(ev, m.RemoveEvent):
        name = (f"{ev.group}/" if ev.group is not None else "") + (ev.event or "")
        return " ".join([f"-:{name}", *ev.match])
    return " ".join([_format_head(ev), _format_target(ev), *map(format_arg, ev.args)])


def _format_head(ev: m.ProbeEvent) -> str:
    letter = "p" if ev.return_suffix and ev.maxactive is None else ev.kind
    head = letter + (str(ev.maxactive) if ev.maxactive is not None else "")
    if ev.group is None and ev.event is None:
        return head
    return f"{head}:" + (f"{ev.group}/" if ev.group is not None else "") + (ev.event or "")


def _format_target(ev: m.ProbeEvent) -> str:
    if ev.address is not None:
        return f"0x{ev.address:x}"
    target = (f"{ev.module}:" if ev.module is not None else "") + (ev.symbol or "")
    if ev.offset:
        target += f"+{ev.offset}"
    return target + ("%return" if ev.return_suffix else "")


def format_arg(arg: m.FetchArg) -> str:
    """One FETCHARG as written on the command line."""
    text = (f"{arg.name}=" if arg.name is not None else "") + format_fetch(arg.fetch)
    if isinstance(arg.type, m.Bitfield):
        text += f":b{arg.type.width}@{arg.type.offset}/{arg.type.size}"
    elif arg.type is not None:
        text += f":{arg.type}"
    return text + (f"[{arg.array}]" if arg.array is not None else "")


def format_fetch(fetch: m.Fetch) -> str:
    """A fetch expression tree as text."""
    match fetch:
        case m.Reg(name):
            return f"%{name}"
        case m.Mem(addr):
            return f"@0x{addr:x}"
        case m.SymMem(sym, 0):
            return f"@{sym}"
        case m.SymMem(sym, offs):
            return f"@{sym}{offs:+d}"
        case m.Stack(n):
            return f"$stack{n}"
        case m.StackPtr():
            return "$stack"
        case m.Arg(n):
            return f"$arg{n}"
        case m.BtfArg(name):
            return name
        case m.AllArgs():
            return "$arg*"
        case m.Retval():
            return "$retval"
        case m.Comm():
            return "$comm"
        case m.Imm(value):
            return f"\\{value}"
        case m.ImmStr(text):
            return f'\\"{text}"'
        case m.Deref(offset, inner, user):
            sign = "-" if offset < 0 else "+"
            return f"{sign}{'u' if user else ''}{abs(offset)}({format_fetch(inner)})"
    raise TypeError(f"not a fetch expression: {fetch!r}")
