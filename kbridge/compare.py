"""`kbridge compare`: one ProbeSpec through kmod, tracefs and bpf on one VM and kernel.

Each mechanism runs the same workload, one after another, with the same
filters. The workload is the user's command repeated REPEATS times, each
repetition bracketed by marker lines written to /dev/kmsg; the kernel log's
microsecond timestamps time every repetition, so per-hit overhead is
(median probed - median unprobed) / hits per repetition, against unprobed
runs of the same script before and after the mechanisms (drift shows in the
spread). The markers are written by the workload's shell, so they are hits
too when that shell matches the filters: equally for every mechanism.
"""

from __future__ import annotations

import re
import secrets
import shlex
import statistics
import time
from dataclasses import dataclass, field

from kbridge import progress
from kbridge.errors import KbridgeError
from kbridge.images import bpftools
from kbridge.mechanisms import NAMES
from kbridge.mechanisms import get as get_mechanism
from kbridge.mechanisms.engine import MechanismResult, StopRule
from kbridge.probe import check_offset
from kbridge.session import Session
from kbridge.spec import Hit, ProbeSpec
from kbridge.targets import ownership
from kbridge.workload import Workload

_MARK = re.compile(r"^\[\s*(?P<t>\d+\.\d+)\] kbt (?P<run>\w+) (?P<phase>\w+) (?P<i>\d+) (?P<be>[be])$")


@dataclass
class MechanismStats:
    """One mechanism's row of the comparison."""

    name: str
    result: MechanismResult | None = None
    skipped: str | None = None  # why it did not run
    durations_ns: list[int] = field(default_factory=list)  # per repetition, probed
    overhead_ns: float | None = None
    setup_s: float | None = None  # mechanism start -> workload start (build, compile, attach)
    agree: str = "-"  # hits' args/retvals vs the reference mechanism

    def to_json(self) -> dict:
        r = self.result
        if r is None:
            return {"skipped": self.skipped}
        return {
            "hits": r.total,
            "counters": r.counters,
            "streamed": len(r.hits),
            "missed": r.missed,
            "lost": r.lost,
            "first_event_s": r.first_event_s,
            "overhead_ns": self.overhead_ns,
            "run_median_ns": _median(self.durations_ns),
            "run_spread_ns": _spread(self.durations_ns),
            "setup_s": self.setup_s,
            "agree": self.agree,
            "notes": r.notes,
        }


@dataclass
class Comparison:
    symbol: str
    arch: str
    kernel: str
    accel: str
    workload: str
    repeats: int
    baseline_ns: list[int]
    mechanisms: dict[str, MechanismStats]
    equal_counts: bool | None = None
    explanation: list[str] = field(default_factory=list)
    target: str = "qemu"

    def summary(self) -> dict:
        return {
            "symbol": self.symbol,
            "arch": self.arch,
            "kernel": self.kernel,
            "accel": self.accel,
            "target": self.target,
            "workload": self.workload,
            "repeats": self.repeats,
            "baseline": {"run_median_ns": _median(self.baseline_ns), "run_spread_ns": _spread(self.baseline_ns)},
            "equal_counts": self.equal_counts,
            "explanation": self.explanation,
            "mechanisms": {n: m.to_json() for n, m in self.mechanisms.items()},
        }


def _median(xs: list[int]) -> float | None:
    return statistics.median(xs) if xs else None


def _spread(xs: list[int]) -> list[int] | None:
    return [min(xs), max(xs)] if xs else None


def timed_script(command: str, run_id: str, phase: str, repeats: int) -> Workload:
    """COMMAND REPEATS times, each bracketed by kmsg markers (run id and phase are ours: [a-z0-9])."""
    mark = f"kbt {run_id} {phase}"
    loop = (
        f'i=0; while [ $i -lt {repeats} ]; do echo "{mark} $i b" > /dev/kmsg; '
        f'( {command} ) >/dev/null 2>&1; echo "{mark} $i e" > /dev/kmsg; i=$((i+1)); done'
    )
    return Workload(("/bin/sh", "-c", loop), f"{command} (x{repeats})")


def durations(dmesg: str, run_id: str, phase: str) -> list[int]:
    """Per-repetition wall times (ns) of PHASE from the markers in the kernel log."""
    begin: dict[int, float] = {}
    out = []
    for line in dmesg.splitlines():
        m = _MARK.match(line.strip())
        if not m or m["run"] != run_id or m["phase"] != phase:
            continue
        if m["be"] == "b":
            begin[int(m["i"])] = float(m["t"])
        elif int(m["i"]) in begin:
            out.append(round((float(m["t"]) - begin[int(m["i"])]) * 1e9))
    return out


def agreement(ref: list[Hit], other: list[Hit]) -> str:
    """Whether two mechanisms fetched the same arguments and return values, hit for hit."""

    def key(h: Hit) -> tuple:
        return (h.handler, tuple(sorted(h.args.items())), h.retval)

    a, b = [key(h) for h in ref], [key(h) for h in other]
    if len(a) != len(b):
        return f"no: {len(b)} hits streamed vs {len(a)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return f"no: hit #{i + 1} differs ({x} vs {y})"
    return "yes"


def _unprobed(session: Session, work: Workload) -> None:
    ownership.spawn(session.target, list(work.argv)).wait(timeout=None)


def compare(
    session: Session, spec: ProbeSpec, command: str, repeats: int = 5, names: tuple[str, ...] = NAMES
) -> Comparison:
    """Run SPEC through each mechanism in NAMES on SESSION's guest with COMMAND repeated REPEATS times."""
    if repeats < 1:
        raise KbridgeError(f"invalid --repeats {repeats}: must be >= 1")
    res = session.resolve(spec.symbol)
    check_offset(spec, res)
    if res.note:
        progress.info(f"resolved {res.note}")
    spec = spec.with_symbol(res.symbol)
    run_id = secrets.token_hex(4)
    stats = {n: MechanismStats(n) for n in names}
    for n, st in stats.items():
        try:
            get_mechanism(n).check(spec, session.arch)
        except KbridgeError as e:
            st.skipped = e.message
    bpf_unbuildable = "bpf" in stats and bpftools.built(session.image) is None and bpftools.host_missing(session.arch)
    if bpf_unbuildable and not stats["bpf"].skipped:
        missing = bpftools.host_missing(session.arch)
        stats["bpf"].skipped = f"kbridge's eBPF probe needs {', '.join(missing)} on this host"
    with progress.step(f"unprobed runs of {command!r} (x{repeats})"):
        _unprobed(session, timed_script(command, run_id, "base0", repeats))
    for n, st in stats.items():
        if st.skipped:
            continue
        try:
            with progress.step(f"{n}: {spec.symbol} with {command!r} (x{repeats})"):
                t0 = time.monotonic()
                st.result = get_mechanism(n).run(session, spec, timed_script(command, run_id, n, repeats), StopRule())
                st.setup_s = round(time.monotonic() - t0, 3)
        except KbridgeError as e:
            st.skipped = f"failed: {e.message}"
    _unprobed(session, timed_script(command, run_id, "base1", repeats))
    log = session.target.run(["/bin/busybox", "dmesg"], timeout=60).stdout.decode(errors="replace")
    baseline = durations(log, run_id, "base0") + durations(log, run_id, "base1")
    ran = [(st, st.result) for st in stats.values() if st.result is not None]
    for st, r in ran:
        st.durations_ns = durations(log, run_id, st.name)
        per_rep = r.total / repeats if r.total else 0
        if st.durations_ns and baseline and per_rep:
            st.overhead_ns = round((statistics.median(st.durations_ns) - statistics.median(baseline)) / per_rep, 1)
    comp = Comparison(
        spec.symbol,
        session.arch.name,
        session.target.krel,
        session.target.accel,
        command,
        repeats,
        baseline,
        stats,
        target=session.target.name,
    )
    if ran:
        ref, ref_result = ran[0]
        for st, r in ran:
            st.agree = "reference" if st is ref else agreement(ref_result.hits, r.hits)
        totals = {st.name: r.total for st, r in ran}
        comp.equal_counts = len(set(totals.values())) == 1
        if not comp.equal_counts:
            top = max(totals.values())
            for st, r in ran:
                if r.total < top or r.missed or r.lost:
                    why = [f"nmissed {r.missed}"] if r.missed else []
                    why += [f"lost {r.lost}"] if r.lost else []
                    why += [nt for nt in r.notes if "lost" in nt or "overrun" in nt]
                    comp.explanation.append(
                        f"{st.name}: {r.total} hits, {top - r.total} fewer than the most"
                        f" ({', '.join(why) or 'no miss or loss reported: filters or timing differ'})"
                    )
    return comp


def workload_command(run: str | None, symbol: str) -> str:
    """The user's --run text, or a default that exercises SYMBOL (as a shell command)."""
    if run:
        return run
    from kbridge.workload import default_for

    w = default_for(symbol)
    return " ".join(shlex.quote(a) for a in w.argv)
