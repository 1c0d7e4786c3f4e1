"""Parse the kernel-log lines a kbridge module prints (see kmod/probe.c.j2) into Hits."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kbridge.arch import ARCHES
from kbridge.spec import Hit

# The registers a handler prints, named as each arch names them (ip/pc, flags/pstate/cpsr).
_IPS = "|".join(sorted({a.ip_register for a in ARCHES.values()}))
_FLAGS = "|".join(sorted({a.flags_register for a in ARCHES.values()}))
# Fixed fields come first and cannot be mistaken for an --arg (printed as NAME=DECIMAL):
# registers are hex with 0x, a duration ends in "ns"; a fault line has no arguments.
_HIT = re.compile(
    r"^(?P<mod>[\w]+): hit=(?P<handler>pre|post|entry|ret|fault) pid=(?P<pid>\d+) tid=(?P<tid>\d+) "
    r"cpu=(?P<cpu>\d+)"
    rf"(?: addr=0x(?P<addr>[0-9a-f]+) (?:{_IPS})=0x(?P<ip>[0-9a-f]+) (?:{_FLAGS})=0x(?P<flags>[0-9a-f]+))?"
    r"(?: at=(?P<at>\S+(?: \[\w+\])?))?"
    r"(?: took=(?P<took>\d+)ns)?"
    r"(?P<kv>(?: \w+=-?\d+)*) comm=(?P<comm>.*)$"
)
_KV = re.compile(r" (\w+)=(-?\d+)")
_FAIL = re.compile(r"^(?P<mod>\w+): register_(?P<what>kprobe|kretprobe) failed: (?P<err>-?\d+) run=(?P<run>\S*)")
_UNLOADED = re.compile(r"^(?P<mod>\w+): unloaded run=(?P<run>\S*)(?P<kv>(?: \w+=-?\d+)*)")
_READY = re.compile(r"^(?P<mod>\w+): ready run=(?P<run>\S*)")
_INSN = re.compile(r"^(?P<mod>\w+): insn(?P<kv>(?: \w+=\S+)*) run=(?P<run>\S*)$")
_DURATIONS = re.compile(r"^(?P<mod>\w+): durations run=(?P<run>\S*) log2_ns=(?P<buckets>-|\d+:\d+(?:,\d+:\d+)*)$")


def parse_hit(text: str, module: str, symbol: str, usec: int | None = None, arch: str | None = None) -> Hit | None:
    """A Hit from one module log line, or None if the line is not a hit of MODULE."""
    m = _HIT.match(text)
    if not m or m["mod"] != module:
        return None
    values = {k: int(v) for k, v in _KV.findall(m["kv"])}
    handler = m["handler"]
    retval = values.pop("ret", None) if handler == "ret" else None
    trap = values.pop("trap", None) if handler == "fault" else None
    regs = m["addr"] is not None
    return Hit(
        mechanism="kmod",
        symbol=symbol,
        handler=handler,
        pid=int(m["pid"]),
        comm=m["comm"],
        cpu=int(m["cpu"]),
        args=dict(values),
        retval=retval,
        timestamp=None if usec is None else usec / 1e6,
        tid=int(m["tid"]),
        addr=int(m["addr"], 16) if regs else None,
        ip=int(m["ip"], 16) if regs else None,
        flags=int(m["flags"], 16) if regs else None,
        arch=arch if regs else None,
        duration_ns=int(m["took"]) if m["took"] is not None else None,
        trap=trap,
        fault_at=m["at"],
    )


@dataclass(frozen=True)
class ModuleEvent:
    """A lifecycle line of a kbridge module: ready, failed (errno) or unloaded (final counters)."""

    kind: str  # "ready" | "failed" | "insn" | "durations" | "unloaded"
    run: str
    errno: int = 0
    what: str = ""
    counters: dict[str, int] | None = None
    buckets: dict[int, int] | None = None  # durations: log2 bucket -> count
    facts: dict[str, str] | None = None  # insn: the kprobe's decoded instruction (Arch.insn_facts)


def parse_buckets(text: str) -> dict[int, int]:
    """'3:10,4:2' (or '-') as the module prints its log2 duration histogram."""
    if text == "-":
        return {}
    return {int(b): int(c) for b, c in (item.split(":") for item in text.split(","))}


def parse_event(text: str, module: str) -> ModuleEvent | None:
    """A lifecycle line of MODULE: ready, register failure, the decoded instruction, return-duration
    histogram, unloaded."""
    if (m := _READY.match(text)) and m["mod"] == module:
        return ModuleEvent("ready", m["run"])
    if (m := _FAIL.match(text)) and m["mod"] == module:
        return ModuleEvent("failed", m["run"], errno=-int(m["err"]), what=m["what"])
    if (m := _INSN.match(text)) and m["mod"] == module:
        return ModuleEvent("insn", m["run"], facts=dict(kv.split("=", 1) for kv in m["kv"].split()))
    if (m := _DURATIONS.match(text)) and m["mod"] == module:
        return ModuleEvent("durations", m["run"], buckets=parse_buckets(m["buckets"]))
    if (m := _UNLOADED.match(text)) and m["mod"] == module:
        return ModuleEvent("unloaded", m["run"], counters={k: int(v) for k, v in _KV.findall(m["kv"])})
    return None


def parse_stats(text: str) -> dict[str, int]:
    """The module's debugfs stats file: 'NAME VALUE' lines (the duration histogram: parse_stats_durations)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_stats_durations(text: str) -> dict[int, int] | None:
    """The log2 duration histogram in the module's stats file, or None without a ret handler."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "durations_log2_ns":
            return parse_buckets(parts[1])
    return None


def _why_again(sites: list[str]) -> str:
    """Why one handler run faulted at each of SITES in turn (the kernel's %pS of each fault)."""
    if len(sites) >= 2 and all(site.startswith("copy_user_") for site in sites[:2]):
        # Measured on 5.10 x86_64: the first fault in copy_user_generic_unrolled, the second at
        # copy_user_enhanced_fast_string+0x27, past that function's end: the local label after it.
        return (
            "x86's copy_user routine faulted, its exception-table fixup jumped to .Lcopy_user_handle_tail "
            "(arch/x86/lib/copy_user_64.S, up to Linux 6.0; a local label, so the kernel names it after the "
            "symbol before it), which retries the bytes left with rep movsb, and that read faulted again: "
            "fault_handler is called once per fault"
        )
    return "fault_handler is called once per fault taken while a handler runs"


class FaultRuns:
    """The faults each handler run took, per thread, to explain a run that took more than one."""

    def __init__(self) -> None:
        self._open: dict[int, list[str]] = {}
        self.repeated: list[list[str]] = []  # the sites of each run that faulted more than once

    def add(self, hit: Hit) -> None:
        tid = hit.tid if hit.tid is not None else hit.pid
        if hit.handler != "fault":
            self._open[tid] = []
            return
        run = self._open.setdefault(tid, [])
        run.append(hit.fault_at or "?")
        if len(run) == 2:
            self.repeated.append(run)

    def note(self) -> str | None:
        """Why a handler run took several faults, from the faulting sites the kernel printed."""
        if not self.repeated:
            return None
        sites = self.repeated[0]
        return (
            f"{len(self.repeated)} handler run(s) took {len(sites)} faults, e.g. at {' then at '.join(sites)}: "
            + _why_again(sites)
        )
