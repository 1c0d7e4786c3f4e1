"""The bcc runner's output: one JSON object per line, {"ev": "ready"|"hit"|"error"|"end", "run": RUN, ...}.

kbridge/guest/bpf_runner.py writes them; this turns them into messages and Hit records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from kbridge.spec import Hit


def messages(lines: Iterator[str | None], run_id: str) -> Iterator[dict | None]:
    """RUN_ID's messages from LINES; None when no line arrived (idle), other runs' lines skipped."""
    for line in lines:
        if line is None:
            yield None
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # a partial line from an interrupted earlier runner
        if isinstance(msg, dict) and msg.get("run") == run_id:
            yield msg


def parse_hit(msg: dict, symbol: str) -> Hit:
    """The Hit in a runner's "hit" message."""
    return Hit(mechanism="bpf", symbol=symbol, handler=msg["h"], pid=msg["pid"], comm=msg["comm"],
               cpu=msg["cpu"], args=dict(msg.get("args", {})), retval=msg.get("ret"), timestamp=msg.get("ts"))
