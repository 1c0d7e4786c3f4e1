"""Where kbridge keeps its files: the XDG cache (images, modules) and runtime state (VMs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$KBRIDGE_CACHE, else $XDG_CACHE_HOME/kbridge, else ~/.cache/kbridge."""
    if env := os.environ.get("KBRIDGE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kbridge"


def state_dir() -> Path:
    """Kept VMs' sockets and pid files: $KBRIDGE_STATE, else under the cache dir."""
    if env := os.environ.get("KBRIDGE_STATE"):
        return Path(env)
    return cache_dir() / "vms"
