"""The eBPF loader's output: one JSON object per line, {"ev": "ready"|"error"|"end", "run": RUN, ...},
and one "H<RUN> <base64>" line per hit: the raw record (struct kb_event of kbridge/guest/bpf/kb_event.h),
decoded here (formatting hits in the emulated guest would cost more than the probe).
"""

from __future__ import annotations

import binascii
import json
import struct
from collections.abc import Iterator

from kbridge.mechanisms.bpf.plan import HANDLERS
from kbridge.spec import Hit

FORMAT = 2  # kb_event.h KB_FORMAT: the loader's "ready" message says which one it writes
# ts, addr, ip, flags, ret, duration, pid, tid, cpu, handler, nargs, comm, pad; then nargs u64 args.
RECORD = struct.Struct("<QQQQqQIIHBB16sI")
assert RECORD.size == 80  # KB_EVENT_FIXED


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
                    raw = binascii.a2b_base64(line[len(hit_prefix) :])
                except (binascii.Error, ValueError):
                    continue
                if len(raw) >= RECORD.size:  # else a partial line (the port was closed mid-line)
                    yield {"ev": "hit", "run": run_id, "raw": raw}
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # a partial line from an interrupted earlier loader
        if isinstance(msg, dict) and msg.get("run") == run_id:
            yield msg


class Decoder:
    """Raw records of one run -> Hits."""

    def __init__(self, arg_names: list[str], symbol: str, arch: str) -> None:
        self.symbol = symbol
        self.names = arg_names
        self.arch = arch  # names ip/flags as the arch's pt_regs does (pc/pstate on arm64)
        self.args = struct.Struct(f"<{len(arg_names)}Q")

    def hit(self, raw: bytes) -> Hit:
        ts, addr, ip, flags, ret, duration, pid, tid, cpu, handler_id, _n, comm, _pad = RECORD.unpack_from(raw)
        handler = HANDLERS[handler_id & 3]
        args = self.args.unpack_from(raw, RECORD.size)
        hit = Hit(
            mechanism="bpf",
            symbol=self.symbol,
            handler=handler,
            pid=pid,
            comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
            cpu=cpu,
            args=dict(zip(self.names, args, strict=True)),
            retval=ret if handler == "ret" else None,
            timestamp=ts / 1e9,
            tid=tid,
        )
        if handler == "ret":
            hit.duration_ns = duration
        else:
            hit.addr = addr or None  # 0: the kernel has no bpf_get_func_ip for kprobes (< 5.15), or an offset
            hit.ip, hit.flags = ip, flags
            hit.arch = self.arch
        return hit
