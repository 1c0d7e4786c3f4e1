"""The real kernel's verdict on each kprobe_events line: what tracing/error_log says.

Used by tests/vm/test_matrix.py (the live re-check) and, run as a script, to
(re)capture tests/unit/data/error_log/<suite>-<arch>.json from real guests:

    KBRIDGE_STATE=/tmp/kbs python -m tests.vm.error_log_capture --kernel 6.12 --arch x86_64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kbridge import kernels, kprobe_events
from kbridge.targets.base import Target

DATA = Path(__file__).resolve().parents[1] / "unit/data/error_log"
CORPUS = DATA / "corpus.txt"
TRACING = "/sys/kernel/tracing"

# One guest shell run for the whole corpus: for each line, clear error_log, append
# the line, print the write's status and error_log, then remove every kprobe event.
# The line reaches the shell as data read from a file, never as code.
_SCRIPT = f"""
cd {TRACING} || exit 3
while IFS= read -r line; do
  : > error_log
  printf '%s\\n' "$line" >> kprobe_events 2>/dev/null
  echo "@@rc $?"
  cat error_log
  echo "@@end"
  : > kprobe_events
done < /tmp/kb-corpus.txt
"""


def corpus() -> list[str]:
    return [ln for ln in CORPUS.read_text().splitlines() if ln.strip()]


def live_verdicts(guest: Target, lines: list[str]) -> list[dict]:
    """Each line's fate in GUEST's kernel: accepted, or the error_log class and caret column."""
    guest.write_file("/tmp/kb-corpus.txt", ("\n".join(lines) + "\n").encode())
    res = guest.run(["/bin/busybox", "sh", "-c", _SCRIPT], timeout=300)
    out = res.stdout.decode() if isinstance(res.stdout, bytes) else res.stdout
    blocks = out.split("@@rc ")[1:]
    if len(blocks) != len(lines):
        raise AssertionError(f"expected {len(lines)} verdicts, got {len(blocks)}: {out[-500:]!r}")
    verdicts = []
    for line, block in zip(lines, blocks, strict=True):
        rc_text, _, log = block.partition("\n")
        log = log.split("@@end", 1)[0]
        entries = [e for e in kprobe_events.parse_error_log(log) if e.subsystem == "trace_kprobe"]
        e = entries[-1] if entries else None
        verdicts.append(
            {
                "line": line,
                "ok": rc_text.strip() == "0",
                "error": e.error_class if e else None,
                "message": e.error if e else None,
                "kernel_position": e.position if e else None,
            }
        )
    return verdicts


def main() -> None:
    from kbridge.targets import acquire

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--arch", default="x86_64")
    a = ap.parse_args()
    suite = kernels.resolve(a.kernel)
    with acquire(a.arch, kernel=suite, keep=True) as guest:
        verdicts = live_verdicts(guest, corpus())
        out = {"suite": suite, "arch": guest.arch.name, "krel": guest.krel, "verdicts": verdicts}
    path = DATA / f"{suite}-{out['arch']}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{path}: {sum(v['ok'] for v in verdicts)} accepted, {sum(not v['ok'] for v in verdicts)} rejected")


if __name__ == "__main__":
    main()
