"""A VM's run directory under the state directory, and the vm.json record inside it.

An ephemeral VM lives in run-PID-N, a kept one in the directory of its arch and kernel
(kept_dir). vm.json records the QEMU process (pid and start time, so a stale pid that now
belongs to something else is never mistaken for it) and the image it booted, which a later
command reads to attach the VM; modules.json lists the user's modules loaded in it
(kbridge.modules keeps it) and `crashed` names the saved report of an oops.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kbridge import kernels, procs, sanitizers
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images.image import DEFAULT_SUITE, Image
from kbridge.paths import state_dir


def kept_dir(arch: Arch, suite: str = DEFAULT_SUITE) -> Path:
    """The kept VM of ARCH and kernel SUITE (a kernel key; one each, e.g. vms/x86_64, vms/arm64-sid,
    vms/x86_64-debug, vms/x86_64-tree-HASH for a user's kernel tree)."""
    return state_dir() / (arch.name if suite == DEFAULT_SUITE else f"{arch.name}-{kernels.slug(suite)}")


def kept_key(rundir: Path) -> tuple[str, str]:
    """(arch name, kernel key) of the kept VM in RUNDIR, from its vm.json (a tree's key is not in
    the directory's name), else from the name."""
    arch_name, _, slug = rundir.name.partition("-")
    try:
        meta = json.loads((rundir / "vm.json").read_text())
        return str(meta.get("arch", arch_name)), str(meta.get("kernel") or meta.get("suite") or DEFAULT_SUITE)
    except (OSError, ValueError, AttributeError):
        return arch_name, slug or DEFAULT_SUITE


def kept_dirs() -> list[Path]:
    """Every kept VM's directory (vm.json inside), whatever its arch and suite."""
    root = state_dir()
    return sorted(p.parent for p in root.glob("*/vm.json") if not p.parent.name.startswith("run-"))


def for_boot(image: Image, keep: bool) -> Path:
    """The directory a VM booted from IMAGE runs in: its kept directory, or a fresh run-PID-N."""
    rundir = (
        kept_dir(image.arch, image.key) if keep else state_dir() / f"run-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    )
    if len(str(rundir / "qga.sock")) > 100:
        raise KbridgeError(
            f"the VM state directory {rundir} is too long for unix sockets",
            "set KBRIDGE_STATE to a shorter directory",
        )
    return rundir


def write_record(
    rundir: Path, proc: procs.Process, image: Image, accel: str, memory_mb: int, cpus: int, gdb: bool
) -> None:
    """vm.json: the QEMU process, its owner, and the image and settings it booted with."""
    (rundir / "vm.json").write_text(
        json.dumps(
            {
                "pid": proc.pid,
                "create_time": proc.start,
                "accel": accel,
                "image": str(image.dir),
                "suite": image.suite,
                "kernel": image.key,
                "arch": image.arch.name,
                "flavour": image.flavour,
                "owner": os.getpid(),
                "owner_create_time": procs.start_time(os.getpid()),
                "krel": image.krel,
                "version": image.version,
                "memory_mb": memory_mb,
                "cpus": cpus,
                "gdb": gdb,
            }
        )
    )


def image_of(meta: dict, arch: Arch) -> Image | None:
    """The image a kept VM was booted from, as its vm.json records it: found by that path, so a
    command run with another cache directory attaches the VM too (and does not stop it)."""
    d = Path(meta.get("image", ""))
    if meta.get("version") and (d / "kernel").is_file() and (d / "headers").is_dir():
        key = meta.get("kernel") or meta["suite"]
        return Image(
            d,
            arch,
            meta["suite"],
            meta["krel"],
            meta["version"],
            meta.get("flavour", "default"),
            kernel_id="" if key == meta["suite"] else key,
            cmdline=_manifest_cmdline(d),
        )
    if meta.get("flavour") in ("bcc", "bench"):
        from kbridge.images import bcc

        return bcc.load(arch, meta["suite"], meta["flavour"])
    from kbridge.images.image import load

    return load(arch, meta["suite"], verify=False)


def _manifest_cmdline(d: Path) -> str:
    try:
        return str(json.loads((d / "manifest.json").read_text()).get("cmdline", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def user_modules(rundir: Path) -> list[str]:
    """The user's modules kbridge loaded into the VM of RUNDIR (kbridge.modules keeps the list)."""
    try:
        return list(json.loads((rundir / "modules.json").read_text()))
    except (OSError, ValueError, TypeError):
        return []


def restart_notice(rundir: Path, arch: Arch) -> str:
    """What the user is told when the crashed kept VM of RUNDIR restarts: its saved report, the
    checker that reported, and which of their modules it held and no longer does."""
    lost = user_modules(rundir)
    report = (rundir / "crashed").read_text(errors="replace").strip()
    said = f" (its report: {report})" if report else ""
    what = "had crashed"
    if (title := _report_title(report)) and (checker := sanitizers.kind(title)) is not None:
        what = f"reported {checker}, whose kernel is not reused"  # lockdep is off after its first report
    gone = (
        f"; {', '.join(sorted(lost))} {'was' if len(lost) == 1 else 'were'} loaded in it and "
        f"{'is' if len(lost) == 1 else 'are'} not now (kbridge module load DIR)"
        if lost
        else ""
    )
    return f"the kept {arch.name} VM {what}{said}: it was stopped and restarts now{gone}"


def _report_title(report: str) -> str:
    """The first line of the saved report at path REPORT (its title), or ""."""
    try:
        with open(report, errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""
