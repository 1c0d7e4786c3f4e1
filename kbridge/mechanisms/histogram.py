"""Return durations: a log2 histogram (as bcc's funclatency) and entry/return pairing.

The kernel module keeps the histogram itself (exact, every call, whatever
printk loses); for mechanisms that only report timestamps (tracefs `p`/`r`
pairs, eBPF) durations come from pairing each return with its thread's entry.
Bucket i holds durations d with d.bit_length() == i: 0 holds 0 ns, i >= 1
holds 2**(i-1) .. 2**i - 1 ns (the module's fls64()).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kbridge.spec import Hit

BAR_WIDTH = 40


def bucket_of(ns: int) -> int:
    """The log2 bucket of a duration in ns (fls64 in the module)."""
    if ns < 0:
        raise ValueError(f"negative duration {ns}")
    return ns.bit_length()


def bucket_range(bucket: int) -> tuple[int, int]:
    """The smallest and largest duration (ns) in BUCKET."""
    return (0, 0) if bucket == 0 else (1 << (bucket - 1), (1 << bucket) - 1)


@dataclass
class Log2Histogram:
    """Counts of durations per log2 bucket."""

    buckets: dict[int, int] = field(default_factory=dict)
    source: str = "hits"  # "module" (exact, in-kernel) | "hits" (from the hits streamed)

    @classmethod
    def of(cls, durations: Iterable[int], source: str = "hits") -> Log2Histogram:
        h = cls(source=source)
        for ns in durations:
            h.add(ns)
        return h

    def add(self, ns: int) -> None:
        b = bucket_of(ns)
        self.buckets[b] = self.buckets.get(b, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.buckets.values())

    def rows(self) -> list[tuple[int, int, int]]:
        """(low ns, high ns, count) for every bucket from the first non-empty to the last."""
        if not self.buckets:
            return []
        lo, hi = min(self.buckets), max(self.buckets)
        return [(*bucket_range(b), self.buckets.get(b, 0)) for b in range(lo, hi + 1)]

    def to_json(self) -> dict:
        return {
            "unit": "ns",
            "source": self.source,
            "total": self.total,
            "buckets": [{"low": lo, "high": hi, "count": n} for lo, hi, n in self.rows()],
        }

    def text(self) -> list[str]:
        """funclatency-style lines: '      ns range : count  |****   |'."""
        rows = self.rows()
        if not rows:
            return []
        peak = max(n for _, _, n in rows) or 1
        width = len(str(rows[-1][1]))
        out = [f"{'ns':>{width * 2 + 5}} : count    distribution"]
        for lo, hi, n in rows:
            bar = "*" * round(n * BAR_WIDTH / peak)
            out.append(f"{lo:>{width}} -> {hi:<{width}} : {n:<8} |{bar:<{BAR_WIDTH}}|")
        return out


class ReturnPairer:
    """Gives each return hit without a duration the time since its thread's last entry hit.

    For mechanisms that report an entry and a return event with timestamps
    (tracefs p/r pairs on one symbol): nested or recursive calls pair innermost first.
    Feed hits in the order they were recorded (per thread, that is trace order).
    """

    def __init__(self) -> None:
        self._open: dict[tuple[int, str], list[float]] = {}

    def feed(self, hit: Hit) -> bool:
        """Record an entry, or set a return's duration_ns; True if HIT got a duration."""
        key = (hit.tid if hit.tid is not None else hit.pid, hit.symbol)
        if hit.handler in ("entry", "pre") and hit.timestamp is not None:
            self._open.setdefault(key, []).append(hit.timestamp)
        elif hit.handler == "ret" and hit.duration_ns is None and hit.timestamp is not None:
            stack = self._open.get(key)
            if stack:
                hit.duration_ns = max(0, round((hit.timestamp - stack.pop()) * 1e9))
                return True
        return False


def pair_durations(hits: list[Hit]) -> list[Hit]:
    """ReturnPairer over HITS; the return hits that got a duration."""
    pairer = ReturnPairer()
    return [h for h in hits if pairer.feed(h)]


def durations_of(hits: list[Hit]) -> Log2Histogram | None:
    """The histogram of the return hits' durations, or None if no hit has one."""
    values = [h.duration_ns for h in hits if h.handler == "ret" and h.duration_ns is not None]
    return Log2Histogram.of(values) if values else None
