"""Parse the kernel-log lines a kbridge module prints (see kmod/probe.c.j2) into Hits."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kbridge.spec import Hit

_HIT = re.compile(
    r"^(?P<mod>[\w]+): hit=(?P<handler>pre|post|entry|ret) pid=(?P<pid>\d+) tid=(?P<tid>\d+) "
    r"cpu=(?P<cpu>\d+)(?P<kv>(?: \w+=-?\d+)*) comm=(?P<comm>.*)$"
)
_KV = re.compile(r" (\w+)=(-?\d+)")
_FAIL = re.compile(r"^(?P<mod>\w+): register_(?P<what>kprobe|kretprobe) failed: (?P<err>-?\d+) run=(?P<run>\S*)")
_UNLOADED = re.compile(r"^(?P<mod>\w+): unloaded run=(?P<run>\S*)(?P<kv>(?: \w+=-?\d+)*)")
_READY = re.compile(r"^(?P<mod>\w+): ready run=(?P<run>\S*)")


def parse_hit(text: str, module: str, symbol: str, usec: int | None = None) -> Hit | None:
    """A Hit from one module log line, or None if the line is not a hit of MODULE."""
    m = _HIT.match(text)
    if not m or m["mod"] != module:
        return None
    values = {k: int(v) for k, v in _KV.findall(m["kv"])}
    retval = values.pop("ret", None)
    return Hit(mechanism="kmod", symbol=symbol, handler=m["handler"], pid=int(m["pid"]),
               comm=m["comm"], cpu=int(m["cpu"]), args=dict(values), retval=retval,
               timestamp=None if usec is None else usec / 1e6)


@dataclass(frozen=True)
class ModuleEvent:
    """A lifecycle line of a kbridge module: ready, failed (errno) or unloaded (final counters)."""

    kind: str  # "ready" | "failed" | "unloaded"
    run: str
    errno: int = 0
    what: str = ""
    counters: dict[str, int] | None = None


def parse_event(text: str, module: str) -> ModuleEvent | None:
    if (m := _READY.match(text)) and m["mod"] == module:
        return ModuleEvent("ready", m["run"])
    if (m := _FAIL.match(text)) and m["mod"] == module:
        return ModuleEvent("failed", m["run"], errno=-int(m["err"]), what=m["what"])
    if (m := _UNLOADED.match(text)) and m["mod"] == module:
        return ModuleEvent("unloaded", m["run"], counters={k: int(v) for k, v in _KV.findall(m["kv"])})
    return None


def parse_stats(text: str) -> dict[str, int]:
    """The module's debugfs stats file: 'NAME VALUE' lines."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out
