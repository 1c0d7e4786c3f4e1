"""Check results: each check has a name, a status, what was seen, and a hint that teaches."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from kbridge import progress
from kbridge.errors import KbridgeError


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"  # not run: a check it needs failed first


@dataclass(frozen=True)
class CheckSpec:
    """A check a lab runs: its name, what it verifies, and the hint shown when it fails."""

    name: str
    verifies: str
    hint: str


@dataclass
class CheckResult:
    name: str
    status: Status
    detail: str
    hint: str
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS

    def to_json(self) -> dict:
        if self.status is Status.SKIP:  # a check that did not run has a reason, nothing else
            return {"name": self.name, "status": self.status.value, "passed": False, "score": 0, "reason": self.detail}
        return {
            "name": self.name,
            "status": self.status.value,
            "passed": self.passed,
            "score": 1 if self.passed else 0,
            "detail": self.detail,
            "hint": None if self.passed else self.hint,
            "seconds": round(self.seconds, 2),
        }

    @classmethod
    def from_json(cls, obj: dict) -> CheckResult:
        status = Status(obj["status"])
        detail = str(obj.get("reason", "") if status is Status.SKIP else obj.get("detail", ""))
        return cls(str(obj["name"]), status, detail, str(obj.get("hint") or ""), float(obj.get("seconds", 0.0)))


@dataclass
class Report:
    """One lab directory graded on one arch and kernel."""

    lab: str
    directory: str
    arch: str
    kernel: str = ""
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None  # the whole lab could not run here (e.g. its kernel is not built)
    crashed: bool = False  # the student's code oopsed, panicked or hung the guest kernel
    vm_restarted: bool = False  # the VM was replaced afterwards (after a crash, or as a precaution)

    @property
    def ok(self) -> bool:
        return self.skipped is None and bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def score(self) -> tuple[int, int]:
        return sum(c.passed for c in self.checks), len(self.checks)

    def status_of(self, name: str) -> Status:
        for c in self.checks:
            if c.name == name:
                return c.status
        raise KeyError(name)

    def to_json(self) -> dict:
        got, total = self.score
        return {
            "lab": self.lab,
            "directory": self.directory,
            "arch": self.arch,
            "kernel": self.kernel,
            "ok": self.ok,
            "score": got,
            "total": total,
            "skipped": self.skipped,
            "crashed": self.crashed,
            "vm_restarted": self.vm_restarted,
            "seconds": round(self.seconds, 1),
            "checks": [c.to_json() for c in self.checks],
        }

    @classmethod
    def from_json(cls, obj: dict) -> Report:
        """A report as to_json wrote it (`lab report` reads them back; KeyError/ValueError if malformed)."""
        return cls(
            lab=str(obj["lab"]),
            directory=str(obj["directory"]),
            arch=str(obj["arch"]),
            kernel=str(obj.get("kernel") or ""),
            checks=[CheckResult.from_json(c) for c in obj.get("checks") or []],
            seconds=float(obj.get("seconds") or 0.0),
            skipped=None if obj.get("skipped") is None else str(obj["skipped"]),
            crashed=bool(obj.get("crashed")),
            vm_restarted=bool(obj.get("vm_restarted")),
        )


class StudentCrash(KbridgeError):
    """The student's code oopsed or hung the guest kernel; `text` is what the kernel said."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


class StepTimeout(KbridgeError):
    """A command of the check did not finish in time, in a guest that still answers: it was killed
    (STUCK: it did not die, being inside the kernel) and the guest is kept unless stuck."""

    def __init__(self, what: str, limit: float, elapsed: float, stuck: bool = False) -> None:
        tail = (
            "; it did not die when killed: it is stuck inside the kernel, so the VM is restarted"
            if stuck
            else "; it was killed, the VM is kept"
        )
        super().__init__(f"{what} did not finish within {limit:.0f} s (stopped after {elapsed:.1f} s){tail}")
        self.what = what
        self.limit = limit
        self.elapsed = elapsed
        self.stuck = stuck


class Grader:
    """Records a lab's checks in order. A check whose prerequisites failed is skipped, and
    checks never reached (an oops, an early stop) are skipped with the reason."""

    def __init__(self, specs: list[CheckSpec], report: Report) -> None:
        self.specs = {s.name: s for s in specs}
        self.order = [s.name for s in specs]
        self.report = report
        self._results: dict[str, CheckResult] = {}
        self._t0 = time.monotonic()

    def _add(self, name: str, status: Status, detail: str, hint: str | None = None) -> None:
        if name not in self.specs:
            raise KeyError(f"unknown check {name!r}")
        now = time.monotonic()
        self._results[name] = CheckResult(name, status, detail.rstrip(), hint or self.specs[name].hint, now - self._t0)
        self._t0 = now
        progress.info(f"{self.report.lab}: {name}: {status.value}")  # a check's verdict as it is known

    def passed(self, name: str) -> bool:
        r = self._results.get(name)
        return r is not None and r.passed

    def ready(self, name: str, *needs: str) -> bool:
        """Whether NAME can run: every check in NEEDS passed; otherwise NAME is skipped."""
        missing = [n for n in needs if not self.passed(n)]
        if missing:
            self._add(name, Status.SKIP, f"not run: needs {', '.join(missing)} to pass first")
            return False
        return True

    def result(self, name: str, ok: bool, detail: str) -> bool:
        self._add(name, Status.PASS if ok else Status.FAIL, detail)
        return ok

    def fail(self, name: str, detail: str, hint: str | None = None) -> bool:
        self._add(name, Status.FAIL, detail, hint)
        return False

    def done(self, name: str) -> bool:
        return name in self._results

    def finish(self, reason: str = "not run") -> Report:
        """The report, every check in the lab's order; unrecorded ones skipped with REASON."""
        self.report.checks = [
            self._results.get(n) or CheckResult(n, Status.SKIP, reason, self.specs[n].hint) for n in self.order
        ]
        return self.report
