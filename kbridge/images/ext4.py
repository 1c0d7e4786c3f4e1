"""A root filesystem directory made into a partitionless ext4 file (the bcc image's disk, a box's)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kbridge.errors import KbridgeError


def make_ext4(rootfs: Path, out: Path, mb: int, label: str, what: str, journal: bool = True) -> None:
    """OUT: an ext4 of MB megabytes holding ROOTFS, files owned by root (mkfs.ext4 -d, e2fsprogs 1.43)."""
    features = [] if journal else ["-O", "^has_journal"]
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, *features, "-E", "root_owner=0:0", "-d", str(rootfs), str(out)]
    proc = subprocess.run([*argv, f"{mb}M"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KbridgeError(
            f"mkfs.ext4 of the {what} root filesystem failed: {proc.stderr.strip()}",
            "install e2fsprogs >= 1.43 (mkfs.ext4 -d)",
        )
