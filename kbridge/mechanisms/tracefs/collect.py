"""Parse what Linux 6.1 prints on tracing/trace_pipe for kprobe events into Hits.

A kprobe event line, with the default trace_options (irq-info on, record-tgid off):

    ``              sh-125     [000] .N...   115.478631: myw: (ksys_write+0x0/0xf0) fd=1 buf="hi" count=2``

and a kretprobe event line: ``myr: (do_syscall_64+0x5d/0xb0 <- ksys_write) ret=17``.
Field values are printed by the print_type_* functions of
kernel/trace/trace_probe.c: decimal for u*/s*, ``0x..`` for x*, ``"..."`` for
strings (raw: no escaping, so a string holding a newline continues on the next
line, and ``(fault)`` without quotes when the read failed), ``{a,b}`` for
arrays, ``%pS`` for symbol.  Lost events show as ``CPU:N [LOST M EVENTS]``
(print_trace_line() in kernel/trace/trace.c).

The parser is told the events it listens for (their argument names and types,
from the kbridge.kprobe_events model), reads the fields in that order, and so copes
with strings containing spaces, quotes, ``name=`` text or newlines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kbridge import kprobe_events
from kbridge.kprobe_events.grammar import BASIC_TYPES, STRING_TYPES
from kbridge.spec import Hit

MAX_CONTINUATION_LINES = 64  # a string with more newlines than this is given up on

_HEAD = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*(?P<tgid>[\d-]+)\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>\S{4,5})\s+)?(?P<ts>\d+\.\d+): (?P<event>[A-Za-z_][\w]*): (?P<rest>.*)$",
    re.S,
)
_LOST = re.compile(r"^CPU:(?P<cpu>\d+) \[LOST (?P<n>\d+) EVENTS\]\s*$")
_PROBE_SITE = re.compile(r"^\((?P<site>[^()]*?)(?: <- (?P<func>[^()]*))?\)")
INT_TYPES = frozenset(BASIC_TYPES) - {"symbol"}


@dataclass(frozen=True)
class EventArg:
    """One field of a kprobe event, as trace_pipe prints it."""

    name: str
    type: str  # u8..x64, symbol, string, ustring, symstr, or "bitfield"
    array: int | None = None
    retval: bool = False  # fetches $retval


@dataclass(frozen=True)
class EventInfo:
    """What the collector needs to know about one defined event."""

    group: str
    name: str
    symbol: str  # probed symbol (or hex address) for Hit.symbol
    is_return: bool
    args: tuple[EventArg, ...]

    @property
    def full_name(self) -> str:
        return f"{self.group}/{self.name}"

    @classmethod
    def from_probe(cls, ev: kprobe_events.ProbeEvent) -> EventInfo:
        """The trace_pipe shape of a parsed kprobe_events line."""
        args = []
        for i, a in enumerate(ev.args):
            if isinstance(a.type, kprobe_events.Bitfield):
                type_ = "bitfield"
            elif a.type is not None:
                type_ = a.type
            elif isinstance(a.fetch, (kprobe_events.Comm, kprobe_events.ImmStr)):
                type_ = "string"
            else:
                type_ = "x64"  # DEFAULT_FETCH_TYPE on 64-bit kernels
            args.append(EventArg(a.name or f"arg{i + 1}", type_, a.array, isinstance(a.fetch, kprobe_events.Retval)))
        symbol = ev.symbol if ev.address is None else f"0x{ev.address:x}"
        if ev.module:
            symbol = f"{ev.module}:{symbol}"
        return cls(ev.effective_group, ev.effective_event, symbol or "", ev.is_return, tuple(args))


@dataclass
class Record:
    """One parsed trace_pipe event line (before it becomes a Hit)."""

    event: str
    comm: str
    pid: int
    cpu: int
    flags: str
    timestamp: float
    site: str
    args: dict[str, int | str | list | None]
    raw: str = ""  # the line(s) as trace_pipe printed them


@dataclass
class TraceHit(Hit):
    """A Hit that also names the tracefs event (GROUP/EVENT) that recorded it."""

    event: str = ""
    raw: str = ""  # the kernel's own trace line, as `cat trace_pipe` shows it

    def to_json(self) -> dict:
        out = super().to_json()
        out["event"] = self.event
        out["raw"] = self.raw
        return out


class ParseError(ValueError):
    """A line that is not what the event's definition says it should be."""


class _Incomplete(Exception):
    """A string field is still open: the value continues on the next line."""


def _parse_scalar(text: str, type_: str) -> int | str | None:
    if text == "(fault)":
        return None
    if type_ in INT_TYPES or type_ == "bitfield":
        try:
            return int(text, 0) if text.startswith(("0x", "-0x")) else int(text)
        except ValueError:
            raise ParseError(f"not a {type_} value: {text!r}") from None
    return text  # symbol: "sym+0x0/0x10" as %pS prints it


def _parse_args(rest: str, info: EventInfo) -> dict[str, int | str | list | None]:
    """Read NAME=VALUE fields in definition order; raise _Incomplete for an open string."""
    out: dict[str, int | str | list | None] = {}
    pos = 0
    n = len(info.args)
    for i, arg in enumerate(info.args):
        if i:
            if rest[pos : pos + 1] != " ":
                raise ParseError(f"expected ' {arg.name}=' at {rest[pos : pos + 20]!r}")
            pos += 1
        key = f"{arg.name}="
        if not rest.startswith(key, pos):
            raise ParseError(f"expected {key!r} at {rest[pos : pos + 20]!r}")
        pos += len(key)
        nxt = f" {info.args[i + 1].name}=" if i + 1 < n else None
        if arg.type in STRING_TYPES and arg.array is None and rest.startswith('"', pos):
            # Raw string: it ends at the '"' that is followed by the next field
            # (or by the end of the line for the last field).
            if nxt is None:
                if not rest.endswith('"') or len(rest) - pos < 2:
                    raise _Incomplete
                out[arg.name] = rest[pos + 1 : -1]
                pos = len(rest)
                continue
            end = rest.find('"' + nxt, pos + 1)
            if end < 0:
                raise _Incomplete
            out[arg.name] = rest[pos + 1 : end]
            pos = end + 1
            continue
        end = rest.find(nxt, pos) if nxt is not None else len(rest)
        if end < 0:
            raise ParseError(f"field {arg.name!r} is not followed by {nxt!r}")
        text = rest[pos:end]
        pos = end
        if arg.array is not None and text.startswith("{") and text.endswith("}"):
            items = text[1:-1].split(",") if len(text) > 2 else []
            if arg.type in STRING_TYPES:
                out[arg.name] = [s[1:-1] if s.startswith('"') else None for s in items]
            else:
                out[arg.name] = [_parse_scalar(s, arg.type) for s in items]
        elif arg.type in STRING_TYPES:
            out[arg.name] = None if text == "(fault)" else text
        else:
            out[arg.name] = _parse_scalar(text, arg.type)
    if pos != len(rest):
        raise ParseError(f"unexpected text after the last field: {rest[pos : pos + 40]!r}")
    return out


@dataclass
class TracePipeParser:
    """Feed trace_pipe lines; get Records for the known events, count LOST and the rest.

    ``events`` maps the event name as trace_pipe prints it (the event, without
    its group) to its EventInfo.  Lines of other events are counted in
    ``other``; lines that should be ours but do not parse in ``unparsed``.
    """

    events: dict[str, EventInfo]
    lost: int = 0  # sum of "[LOST n EVENTS]"
    other: int = 0
    unparsed: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)  # tracing_mark_write payloads
    _pending: str | None = None
    _pending_lines: int = 0

    def feed(self, line: str) -> Record | None:
        """One line from trace_pipe (without its newline); a Record when an event completes."""
        if self._pending is not None:
            text = self._pending + "\n" + line
            self._pending_lines += 1
        else:
            if m := _LOST.match(line):
                self.lost += int(m["n"])
                return None
            text = line
            self._pending_lines = 0
        self._pending = None
        m = _HEAD.match(text)
        if not m:
            if text.strip():
                self.other += 1
            return None
        name = m["event"]
        info = self.events.get(name)
        if info is None:
            if name == "tracing_mark_write":
                self.markers.append(m["rest"].rstrip())
            else:
                self.other += 1
            return None
        rest = m["rest"]
        site = _PROBE_SITE.match(rest)
        if not site:
            self.unparsed.append(text)
            return None
        body = rest[site.end() :]
        if body.startswith(" "):
            body = body[1:]
        try:
            args = _parse_args(body, info) if info.args else {}
            if not info.args and body:
                raise ParseError(f"unexpected text {body[:40]!r}")
        except _Incomplete:
            if self._pending_lines >= MAX_CONTINUATION_LINES:
                self.unparsed.append(text)
                return None
            self._pending = text
            return None
        except ParseError:
            self.unparsed.append(text)
            return None
        return Record(
            name,
            m["comm"],
            int(m["pid"]),
            int(m["cpu"]),
            m["flags"] or "",
            float(m["ts"]),
            site.group(0)[1:-1],
            args,
            text,
        )

    def flush(self) -> None:
        """End of stream: an event still waiting for its string's end is unparsed."""
        if self._pending is not None:
            self.unparsed.append(self._pending)
            self._pending = None

    def hit(self, rec: Record) -> TraceHit:
        """A Hit(mechanism="tracefs") for a Record of one of our kprobe_events."""
        info = self.events[rec.event]
        retval = None
        for arg in info.args:
            value = rec.args.get(arg.name)
            if arg.retval and isinstance(value, int):
                retval = value
                break
        return TraceHit(
            mechanism="tracefs",
            symbol=info.symbol,
            handler="ret" if info.is_return else "pre",
            pid=rec.pid,
            comm=rec.comm,
            cpu=rec.cpu,
            args=dict(rec.args),  # type: ignore[arg-type]  # tracefs arrays (list values) are JSON-able too
            retval=retval,
            timestamp=rec.timestamp,
            event=info.full_name,
            raw=rec.raw,
        )


# --- loss counters ------------------------------------------------------------


@dataclass(frozen=True)
class CpuStats:
    """tracing/per_cpu/cpuN/stats (ring_buffer counters, kernel/trace/trace.c tracing_stats_read)."""

    entries: int = 0
    overrun: int = 0  # events overwritten before they were read (overwrite mode)
    commit_overrun: int = 0  # events dropped by nested writes that filled a page
    dropped: int = 0  # events refused because the buffer was full (nooverwrite mode)
    read: int = 0

    @property
    def lost(self) -> int:
        return self.overrun + self.commit_overrun + self.dropped

    def __sub__(self, before: CpuStats) -> CpuStats:
        return CpuStats(
            *(
                max(0, a - b)
                for a, b in zip(  # noqa: B905 - two fixed five-field tuples
                    (self.entries, self.overrun, self.commit_overrun, self.dropped, self.read),
                    (before.entries, before.overrun, before.commit_overrun, before.dropped, before.read),
                )
            )
        )


_STAT_KEYS = {
    "entries": "entries",
    "overrun": "overrun",
    "commit overrun": "commit_overrun",
    "dropped events": "dropped",
    "read events": "read",
}


def parse_cpu_stats(text: str) -> CpuStats:
    """Parse one per_cpu/cpuN/stats file."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in _STAT_KEYS and value.strip().isdigit():
            values[_STAT_KEYS[key.strip()]] = int(value.strip())
    return CpuStats(**values)


def parse_kprobe_profile(text: str) -> dict[str, tuple[int, int]]:
    """tracing/kprobe_profile: event name -> (nhit, nmissed).

    6.1 prints only the event name (no group) and counts hits before event
    filters run, so nhit includes filtered-out calls.
    """
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out[parts[0]] = (int(parts[1]), int(parts[2]))
    return out
