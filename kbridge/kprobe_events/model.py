"""The typed model of one kprobe_events line: probe and removal commands, fetch arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from kbridge.kprobe_events.grammar import DEFAULT_GROUP, MAX_EVENT_NAME_LEN


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
