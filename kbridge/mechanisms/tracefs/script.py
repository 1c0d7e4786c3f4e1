"""The guest side of a tracefs run in three guest commands: kbridge/guest/tracefs.sh's arguments and output.

The script arms (state saved, clashes refused, buffer sized, events defined, reader started, filters
set, start marker, events enabled), stops (events disabled, end marker, counters read) and undoes a run
(events removed, the state put back, the ledger told), each in one guest command: a warm `kbridge trace`
costs three agent round trips where doing each file operation from the host cost ~40. Everything the
user wrote reaches the script as an argument, never as part of its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kbridge.guest import GUEST_DIR

SCRIPT = GUEST_DIR / "tracefs.sh"
RUN_DIR = "/run/kbridge"


def argv(command: str, *args: str) -> list[str]:
    """The guest argv running the script's COMMAND with ARGS."""
    return ["/bin/busybox", "sh", "-c", SCRIPT.read_text(), "kbridge-tracefs", command, *args]


@dataclass
class Output:
    """What the script printed: its verdict line and the files it showed, by tag."""

    verdict: str = ""  # the first untagged line: "ok READER", "clash ...", "define-failed I", ...
    sections: dict[str, list[str]] = field(default_factory=dict)  # E0, E1, W, F, L, S0, S1, P, K -> lines

    def text(self, tag: str) -> str:
        return "".join(f"{ln}\n" for ln in self.sections.get(tag, []))

    def stats(self, tag: str) -> dict[str, str]:
        """S0/S1: each CPU's stats file, by cpuN."""
        out: dict[str, str] = {}
        for ln in self.sections.get(tag, []):
            cpu, _, rest = ln.partition(" ")
            out[cpu] = out.get(cpu, "") + rest + "\n"
        return out


TAGS = frozenset({"E0", "E1", "W", "F", "L", "S0", "S1", "P", "K"})


def parse(text: str) -> Output:
    """The script's stdout, as an Output."""
    out = Output()
    for line in text.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in TAGS:
            out.sections.setdefault(tag, []).append(rest)
        elif not out.verdict and line:
            out.verdict = line
    return out
