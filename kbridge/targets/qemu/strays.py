"""QEMU processes and run directories that kbridge started and nobody owns any more."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kbridge import procs
from kbridge.paths import state_dir

if TYPE_CHECKING:
    import psutil


def _owner_alive(meta: dict) -> bool:
    """Whether the kbridge process that started an ephemeral VM still runs (pid + start time)."""
    try:
        return procs.alive(int(meta["owner"]), float(meta["owner_create_time"]))
    except (KeyError, TypeError, ValueError):
        return False


def _abandoned(rundir: Path) -> bool:
    """A run directory without QEMU whose owner is gone (or that never got a QEMU, 2 min on)."""
    try:
        return not _owner_alive(json.loads((rundir / "vm.json").read_text()))
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            return time.time() - rundir.stat().st_mtime > 120
        return False


def orphans() -> list[psutil.Process]:
    """QEMU processes started by kbridge that nobody owns: not a kept VM, and their kbridge is gone.

    An ephemeral VM whose kbridge command still runs is not a stray (`vm down --all`
    must not kill a probe in progress). Run directories of dead owners are removed.
    """
    import psutil  # the whole process table: only `vm down --all`, `vm status`, doctor

    found = []
    root = state_dir()
    prefix = str(root).rstrip("/") + "/"  # with the slash: .../vms is not .../vms-other
    running: set[Path] = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if not (p.info.get("name") or "").startswith("qemu-system"):
            continue
        dirs = {Path(a.split("path=", 1)[1].split(",", 1)[0]).parent for a in cmd if "path=" in a and prefix in a}
        if not dirs:
            continue
        rundir = dirs.pop()
        running.add(rundir)
        try:
            meta = json.loads((rundir / "vm.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("pid") == p.pid and (not rundir.name.startswith("run-") or _owner_alive(meta)):
            continue  # a kept VM, or an ephemeral one whose command is still running
        found.append(p)
    for d in root.glob("run-*"):
        if d not in running and _abandoned(d):
            shutil.rmtree(d, ignore_errors=True)  # left by a kbridge that was killed
    return found
