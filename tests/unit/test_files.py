"""kbridge.targets.files: which guest paths a push or pull takes."""

from __future__ import annotations

import pytest

from kbridge.errors import KbridgeError
from kbridge.targets import files

# -- guest paths ------------------------------------------------------------------------


def test_guest_paths():
    assert files.guest_path("/tmp/client", writing=True) == "/tmp/client"
    assert files.guest_path("/tmp/bin/", writing=True) == "/tmp/bin/"
    assert files.guest_path("/proc/kallsyms", writing=False) == "/proc/kallsyms"
    for bad, what in [
        ("tmp/x", "invalid guest path"),
        ("/tmp/../etc/x", "has '..' in it"),
        ("/tmp/a\nb", "invalid guest path"),
        ("/proc/sys/kernel/x", "kernel interface"),
        ("/dev/kbchardev", "kernel interface"),
        ("/sys", "kernel interface"),
    ]:
        with pytest.raises(KbridgeError, match=what):
            files.guest_path(bad, writing=True)
