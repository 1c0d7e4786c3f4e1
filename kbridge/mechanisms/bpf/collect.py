"""The bcc runner's output: one JSON object per line, {"ev": "ready"|"error"|"end", "run": RUN, ...},
and one "H<RUN> <base64>" line per hit: the raw perf event, decoded here with the struct
layout the runner sends in its "ready" message (Python in a TCG guest is too slow to format
hits at the rate a tight loop makes them).

kbridge/guest/bpf_runner.py writes them; this turns them into messages and Hit records.
"""

from __future__ import annotations

import binascii
import json
import struct
from collections.abc import Iterator

from kbridge.spec import Hit

HANDLERS = ("pre", "post", "entry", "ret")


def messages(lines: Iterator[str | None], run_id: str) -> Iterator[dict | None]:
    """RUN_ID's messages from LINES; None when no line arrived (idle), other runs' lines skipped.

    A hit arrives as {"ev": "hit", "raw": bytes}: decode it with a Decoder.
    """
    hit_prefix = f"H{run_id} "
    for line in lines:
        if line is None:
            yield None
            continue
        if line.startswith("H"):
            if line.startswith(hit_prefix):
                try:
                    yield {"ev": "hit", "run": run_id, "raw": binascii.a2b_base64(line[len(hit_prefix) :])}
                except (binascii.Error, ValueError):
                    continue  # a partial line from an interrupted earlier runner
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # a partial line from an interrupted earlier runner
        if isinstance(msg, dict) and msg.get("run") == run_id:
            yield msg


class Decoder:
    """Raw perf events of one program -> Hits, from the layout in the runner's "ready" message."""

    def __init__(self, layout: dict, arg_names: list[str], symbol: str, arch: str | None = None) -> None:
        self.symbol = symbol
        self.names = arg_names
        self.arch = arch  # names ip/flags as the arch's pt_regs does (pc/pstate on arm64)
        self.fields: dict[str, tuple[struct.Struct, int]] = {}
        for name, offset, code, count in layout["fields"]:
            fmt = f"<{count}s" if code == "s" else f"<{count}{code}"
            self.fields[name] = (struct.Struct(fmt), offset)

    def _get(self, raw: bytes, name: str) -> tuple:
        fmt, offset = self.fields[name]
        return fmt.unpack_from(raw, offset)

    def hit(self, raw: bytes) -> Hit:
        g = self._get
        handler = HANDLERS[g(raw, "handler")[0]]
        args = g(raw, "args")
        comm = g(raw, "comm")[0].split(b"\0", 1)[0].decode(errors="replace")
        hit = Hit(
            mechanism="bpf",
            symbol=self.symbol,
            handler=handler,
            pid=g(raw, "pid")[0],
            comm=comm,
            cpu=g(raw, "cpu")[0],
            args={n: int(args[i]) for i, n in enumerate(self.names)},
            retval=int(g(raw, "ret")[0]) if handler == "ret" else None,
            timestamp=g(raw, "ts")[0] / 1e9,
            tid=g(raw, "tid")[0],
        )
        if "ip" in self.fields:  # kmod/bpf.c.j2: the probe address (bpf_get_func_ip), ip/pc, flags/pstate
            if handler == "ret":
                hit.duration_ns = g(raw, "duration")[0]
            else:
                hit.addr = g(raw, "addr")[0] or None  # 0: the kernel has no bpf_get_func_ip for kprobes (< 5.15)
                hit.ip, hit.flags = g(raw, "ip")[0], g(raw, "flags")[0]
                hit.arch = self.arch
        return hit


def parse_hit(msg: dict, symbol: str, decoder: Decoder | None = None) -> Hit:
    """The Hit in a runner's "hit" message (raw, with DECODER; or JSON, from older runners)."""
    if "raw" in msg and decoder is not None:
        return decoder.hit(msg["raw"])
    return Hit(
        mechanism="bpf",
        symbol=symbol,
        handler=msg["h"],
        pid=msg["pid"],
        comm=msg["comm"],
        cpu=msg["cpu"],
        args=dict(msg.get("args", {})),
        retval=msg.get("ret"),
        timestamp=msg.get("ts"),
    )
