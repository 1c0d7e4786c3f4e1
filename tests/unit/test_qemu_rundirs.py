"""What the restart of a crashed kept VM tells the user, from the files in its run directory."""

from __future__ import annotations

import json
from pathlib import Path

from kbridge.arch import ARM64, X86_64
from kbridge.targets.qemu import rundirs

# The title line kbridge.crashes saves first in a report (test_debugkernel's lockdep case, 6.1 debug kernel).
LOCKDEP_TITLE = (
    "WARNING: possible circular locking dependency detected at kbdebug_lock_ba+0x44/0x80 [kbdebug] (in module kbdebug)"
)


def _crashed(rundir: Path, report: Path | None, modules: list[str]) -> Path:
    rundir.mkdir()
    (rundir / "crashed").write_text(str(report or ""))
    (rundir / "modules.json").write_text(json.dumps(modules))
    return rundir


def test_a_checkers_report_names_the_checker_and_the_one_module_lost(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_text(f"{LOCKDEP_TITLE}\nkernel 6.1.0-debug (x86_64)\n\n...\n")
    rundir = _crashed(tmp_path / "x86_64-debug", report, ["kbdebug"])
    assert rundirs.restart_notice(rundir, X86_64) == (
        f"the kept x86_64 VM reported lockdep, whose kernel is not reused (its report: {report}): "
        "it was stopped and restarts now; kbdebug was loaded in it and is not now (kbridge module load DIR)"
    )


def test_an_oops_without_a_saved_report_lists_every_module_lost(tmp_path: Path) -> None:
    rundir = _crashed(tmp_path / "arm64", None, ["zeta", "alpha"])
    assert rundirs.restart_notice(rundir, ARM64) == (
        "the kept arm64 VM had crashed: it was stopped and restarts now; alpha, zeta were loaded in it "
        "and are not now (kbridge module load DIR)"
    )


def test_a_vm_without_user_modules_says_only_that_it_restarts(tmp_path: Path) -> None:
    report = tmp_path / "oops.txt"
    report.write_text("BUG: kernel NULL pointer dereference, address: 0000000000000000\n")
    rundir = _crashed(tmp_path / "x86_64", report, [])
    assert rundirs.restart_notice(rundir, X86_64) == (
        f"the kept x86_64 VM had crashed (its report: {report}): it was stopped and restarts now"
    )
