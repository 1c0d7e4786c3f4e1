"""One grading VM of `kbridge lab check --jobs N` (kbridge.labs.parallel): a process of its own.

It reads {"index", "directory"} lines on stdin, grades each directory in its VM as it comes, and
writes JSON lines on stdout: {"progress": [kind, text]} as it goes, {"index", "report"} for each
directory, {"error", "hint"} if it cannot go on. SIGTERM (or SIGINT) unwinds it like Ctrl-C: its
VM is stopped (a kept one is left running).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kbridge import progress
from kbridge.errors import KbridgeError
from kbridge.labs.runner import Loaded, check_loaded, load_all

_out = threading.Lock()


def _send(obj: dict[str, Any]) -> None:
    with _out:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kbridge.labs.worker")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the VM it boots (the first worker only)")
    parser.add_argument("--fresh", action="store_true", help="boot a VM of its own even when a kept one runs")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    progress.add_sink(lambda kind, text: _send({"progress": [kind, text]}))
    indices: deque[int] = deque()

    def taken() -> Iterator[Loaded]:
        for line in sys.stdin:
            msg = json.loads(line)
            (loaded,) = load_all([Path(msg["directory"])])
            indices.append(int(msg["index"]))
            yield loaded

    try:
        for report in check_loaded(taken(), args.arch, keep=args.keep, reuse_kept=not args.fresh):
            _send({"index": indices.popleft(), "report": report.to_json()})
    except KbridgeError as e:
        _send({"error": e.message, "hint": e.hint})
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a bug still ends in one line for the parent to show
        _send({"error": f"internal error in a grading VM: {type(e).__name__}: {e}", "hint": "this is a kbridge bug"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
