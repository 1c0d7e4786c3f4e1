"""What a lab checker gets: the guest (a Target), the student's files, a host work directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kbridge.labs.guest import LogWatch
from kbridge.labs.kmodule import StudentModule
from kbridge.session import Session
from kbridge.targets.base import Target


@dataclass
class LabContext:
    target: Target
    session: Session
    directory: Path  # the student's lab directory, as given (diagnostics name files under it)
    files: dict[str, str]  # the student's files: name -> text
    workdir: Path  # host scratch directory, removed after the check
    log: LogWatch | None = None
    module: StudentModule | None = None  # set once built: an oops is mapped to its source lines
    cleanups: list = field(default_factory=list)  # callables run after the check, last first
    restart: bool = False  # the student's code left the kernel unsafe (no oops yet): restart the VM
    probes: list[tuple[str, int]] = field(default_factory=list)  # (symbol, offset) the student's code probes

    def student_path(self, name: str) -> str:
        return str(self.directory / name)
