"""No bwrap, or no namespaces: kbridge refuses to build with one line saying what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kbridge import sandbox

HERE = Path(__file__).resolve().parents[2]  # the checkout: kbridge importable from source


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_detected", None)  # restored afterwards


def test_missing_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    with pytest.raises(sandbox.SandboxUnavailable) as e:
        sandbox.detect()
    text = str(e.value)
    assert "\n" not in text
    assert "never builds a submission unsandboxed" in text and "sudo apt-get install bubblewrap" in text
    # run() without an explicit sandbox detects first: nothing is run unsandboxed.
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.run(["true"], ro=[], rw=[], cwd="/", env={}, timeout_s=5, max_output=10)


def test_no_user_namespaces_here(tmp_path: Path) -> None:
    """For real: inside a user namespace whose user.max_user_namespaces is 0 (the kernel then refuses
    every new one, as on a machine with user namespaces disabled), detect() refuses."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); from kbridge import sandbox\n"
        "try:\n    sandbox.detect()\nexcept sandbox.SandboxUnavailable as e:\n    print(str(e)); sys.exit(3)\n"
    )
    (tmp_path / "try.py").write_text(code)
    script = f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} {tmp_path}/try.py"
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line
    assert line.startswith("refusing to build student code: bwrap cannot create its namespaces here (")
    assert "max_*_namespaces exceeded" in line or "Invalid argument" in line
    assert "sudo sysctl -w user.max_user_namespaces=15000" in line
    print(line)


def test_apparmor_restriction_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ubuntu 23.10+ (AppArmor restricts unprivileged user namespaces): bwrap fails with its uid-map
    error; the message names the sysctl. Simulated with a bwrap that fails the same way."""
    real = sandbox.find_bwrap()
    assert real is not None
    fake = tmp_path / "bwrap"
    fake.write_text(
        f'#!/bin/sh\ncase "$1" in --version|--help) exec {real} "$@";; esac\n'
        'echo "bwrap: setting up uid map: Permission denied" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: str(fake))
    real_sysctl = sandbox._sysctl
    monkeypatch.setattr(
        sandbox, "_sysctl", lambda n: "1" if n == "kernel.apparmor_restrict_unprivileged_userns" else real_sysctl(n)
    )
    with pytest.raises(sandbox.SandboxUnavailable) as e:
        sandbox.detect()
    text = str(e.value)
    assert "\n" not in text
    assert "(bwrap: setting up uid map: Permission denied)" in text
    assert "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0" in text


def test_root_falls_back_to_root_userns(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, when the unprivileged bwrap of mode "nobody" cannot start (AppArmor, a sysctl),
    the privileged mode is used."""
    if os.geteuid() != 0:
        pytest.skip("root only")
    real_probe = sandbox.probe
    monkeypatch.setattr(sandbox, "probe", lambda box: "simulated" if box.mode == "nobody" else real_probe(box))
    assert sandbox.detect().mode == "root-userns"


def test_sandbox_that_does_not_start_raises(tmp_path: Path) -> None:
    """A bwrap failure (here: a bind of a path bwrap cannot create) is a SandboxError, not a build result."""
    box = sandbox.detect()
    with pytest.raises(sandbox.SandboxError, match="sandbox path"):
        sandbox.run(["true"], ro=[(tmp_path, "/usr/x")], rw=[], cwd="/", env={}, timeout_s=5, max_output=10, box=box)
    with pytest.raises(sandbox.SandboxError, match="the sandbox did not start"):
        sandbox.run(["true"], ro=[], rw=[], cwd="/nonexistent", env={}, timeout_s=5, max_output=100, box=box)


def test_unreadable_tree_is_named_in_mode_nobody(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only")
    import dataclasses

    box = dataclasses.replace(sandbox.detect(), mode="nobody")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(sandbox.SandboxError, match="not readable by other users"):
        sandbox.run(["true"], ro=[private], rw=[], cwd="/", env={}, timeout_s=5, max_output=10, box=box)


def test_an_older_bwrap_without_the_newer_options_still_works() -> None:
    """Options are used when `bwrap --help` lists them (Ubuntu 22.04's 0.6 lacks --disable-userns)."""
    import dataclasses

    full = sandbox.detect()
    old = dataclasses.replace(
        full, features=full.features - {"--json-status-fd", "--disable-userns", "--size", "--perms"}
    )
    assert sandbox.probe(old) is None
    res = sandbox.run(
        ["sh", "-c", "echo hi; exit 3"], ro=[], rw=[], cwd="/", env={}, timeout_s=5, max_output=100, box=old
    )
    assert (res.returncode, res.output) == (3, "hi\n")
    with pytest.raises(sandbox.SandboxError, match="did not start: bwrap: execvp no-such-command"):
        sandbox.run(["no-such-command"], ro=[], rw=[], cwd="/", env={}, timeout_s=5, max_output=100, box=old)
