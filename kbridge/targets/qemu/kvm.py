"""Whether to try KVM: a bounded probe's verdict, remembered per host boot (nested KVM often hangs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kbridge.arch import Arch, host_arch
from kbridge.paths import cache_dir


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def kvm_usable(arch: Arch) -> tuple[bool, str]:
    """Whether to try KVM at all, and why not."""
    if os.environ.get("KBRIDGE_ACCEL") == "tcg":
        return False, "KBRIDGE_ACCEL=tcg"
    if arch.name != host_arch():
        return False, f"{arch.name} guest on a {host_arch()} host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    verdict = _kvm_verdict()
    if verdict is False:
        return False, "KVM did not boot a guest earlier on this host boot"
    return True, ""


def _kvm_verdict_path() -> Path:
    return cache_dir() / "kvm-verdict.json"  # a fact about the host, shared by all state dirs


def _kvm_verdict() -> bool | None:
    try:
        data = json.loads(_kvm_verdict_path().read_text())
    except (OSError, ValueError):
        return None
    return data.get("ok") if data.get("boot_id") == _boot_id() else None


def record_verdict(ok: bool) -> None:
    _kvm_verdict_path().parent.mkdir(parents=True, exist_ok=True)
    _kvm_verdict_path().write_text(json.dumps({"boot_id": _boot_id(), "ok": ok}))
