"""Kernel-course labs: what the kprobe walk-through teaches, done in real code and graded in a
real kernel (`kbridge lab list|start|check|solution`).

Each lab is data under data/<name>/ (a README and one source per student file, holding the
reference solution with numbered TODO blocks: kbridge.labs.markers derives the skeleton)
and a checker under checkers/ that verifies what the kernel did.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from kbridge.arch import ARCHES
from kbridge.errors import KbridgeError

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Lab:
    """One lab: what it teaches, the files the student edits, where and how it is graded."""

    name: str
    title: str
    teaches: str
    files: tuple[str, ...]  # the student's files, each from data/<name>/<file>
    minutes: int  # a student's estimated time
    kernel: str | None = None  # a --kernel value it needs (None: the default kernel)
    flavour: str = "default"  # "bcc": the guest image with bcc (eBPF)
    # The arches its material is written for (its C, shell and workload have each arch's code).
    arches: tuple[str, ...] = ("x86_64", "arm64")
    # How long `kbridge lab check` takes for the reference solution, measured under TCG with the
    # VM already up (a cold boot adds 3-5 s).
    check_seconds: dict[str, int] = field(default_factory=dict, hash=False, compare=False)

    @property
    def checker(self) -> ModuleType:
        return importlib.import_module(f"kbridge.labs.checkers.{self.name.replace('-', '_')}")

    def source(self, fname: str) -> str:
        return (DATA / self.name / fname).read_text()

    def readme(self) -> str:
        return (DATA / self.name / "README.md").read_text()


LABS: dict[str, Lab] = {
    lab.name: lab
    for lab in (
        Lab(
            "kprobe-module",
            "kprobes the module way",
            "a kprobe from a kernel module: symbol_name, pre- and post-handlers, what the single-step "
            "does to the instruction pointer",
            ("kprobe_lab.c",),
            45,
            check_seconds={"x86_64": 7, "arm64": 9},
        ),
        Lab(
            "kprobe-events",
            "kprobes the tracefs way",
            "p:sys_write_event through kprobe_events: the events/kprobes directory, enable, filter, "
            "trace, disable, remove with -:",
            ("events.sh",),
            30,
            check_seconds={"x86_64": 5, "arm64": 6},
        ),
        Lab(
            "kretprobe",
            "kretprobes: return values and entry data",
            "a kretprobe with an entry handler: per-instance data (a timestamp, an argument), "
            "regs_return_value, maxactive and nmissed",
            ("kretprobe_lab.c",),
            45,
            check_seconds={"x86_64": 9, "arm64": 9},
        ),
        Lab(
            "breakpoint",
            "what a kprobe really plants",
            "predict, then observe with kbridge inspect, the bytes before/armed/after and the mode: "
            "ftrace, optimized jump, int3 (x86_64), BRK #4 (arm64), the undefined instruction (arm)",
            ("answers.txt",),
            30,
            arches=tuple(ARCHES),
            check_seconds={"x86_64": 5, "arm64": 8, "arm": 10},
        ),
        Lab(
            "three-ways",
            "one probe, three mechanisms",
            "the same probe as a module, a tracefs event and an eBPF program, counted side by side under load",
            ("three_lab.c", "event.txt", "three_bpf.c", "answers.txt"),
            60,
            flavour="bcc",
            check_seconds={"x86_64": 22, "arm64": 45},
        ),
        Lab(
            "old-apis",
            "the APIs the walk-through used, on 5.10",
            "on Linux 5.10: a kprobe fault_handler made to fire; jprobes (gone since 4.15) replaced by "
            "reading arguments in a pre-handler",
            ("old_lab.c",),
            40,
            kernel="5.10",
            check_seconds={"x86_64": 7, "arm64": 8},
        ),
    )
}


def get(name: str) -> Lab:
    """The lab called NAME; a KbridgeError naming the labs otherwise."""
    try:
        return LABS[name]
    except KeyError:
        raise KbridgeError(f"unknown lab {name!r}", f"kbridge lab list shows them: {', '.join(LABS)}") from None
