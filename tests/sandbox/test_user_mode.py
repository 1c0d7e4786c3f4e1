"""kbridge run by an ordinary user (a teacher's desktop): bwrap unprivileged, in the user's own user
namespace. Simulated from root by running the grader as uid 65534 with a copy of the headers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sandbox.helpers import HONEST_C, Headers, kbuild_argv

HERE = Path(__file__).resolve().parents[2]  # the checkout: kbridge importable from source
USER = 65534

GRADER = """\
import json, sys
from pathlib import Path
sys.path.insert(0, {here!r})
from kbridge import sandbox
box = sandbox.detect()
out = {{"mode": box.mode, "builds": {{}}}}
for name in ("honest", "evil"):
    work = Path({d!r}) / ("work-" + name)
    sandbox.check_tree(Path({d!r}) / name)
    sandbox.copy_submission(Path({d!r}) / name, work)
    (work / "Kbuild").write_text("obj-m := hello.o\\n")
    argv = json.loads({argv!r})
    argv = [a.replace("@WORK@", str(work)) for a in argv]
    res = sandbox.run(argv, ro=[Path({headers!r})], rw=[work], cwd=work, env={{"LC_ALL": "C"}}, timeout_s=120,
                      max_output=1 << 16)
    out["builds"][name] = {{"ok": res.ok, "output": res.output, "ko": (work / "hello.ko").exists(), "mode": res.mode}}
print(json.dumps(out))
"""


@pytest.fixture
def world(x86: Headers) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user (as a user, the whole suite already runs in mode user)")
    d = Path(tempfile.mkdtemp(prefix="kbridge-usermode-"))
    try:
        d.chmod(0o755)
        shutil.copytree(x86.tree, d / "headers", symlinks=True)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_unprivileged_user_builds_in_the_sandbox(world: Path, x86: Headers) -> None:
    d = world
    home = d / "home"
    home.mkdir()
    token = "KBUSER" + os.urandom(12).hex()
    (home / ".kbridge-secret-test").write_text(token + "\n")
    (home / ".kbridge-secret-test").chmod(0o600)
    (d / "honest").mkdir()
    (d / "honest/hello.c").write_text(HONEST_C)
    (d / "evil").mkdir()
    (d / "evil/hello.c").write_text(f'#include "{home}/.kbridge-secret-test"\n' + HONEST_C)
    for p in [home, home / ".kbridge-secret-test"]:
        os.chown(p, USER, USER)
    for sub in ("work-honest", "work-evil"):
        (d / sub).mkdir()
        os.chown(d / sub, USER, USER)
    headers = d / "headers"
    copy = dataclasses.replace(x86, tree=headers, image=dataclasses.replace(x86.image, dir=d))
    argv = kbuild_argv(copy, Path("@WORK@"))
    (d / "grader.py").write_text(GRADER.format(here=str(HERE), d=str(d), argv=json.dumps(argv), headers=str(headers)))
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python is not None
    proc = subprocess.run([python, "-I", str(d / "grader.py")], capture_output=True, text=True, timeout=300,
                          user=USER, group=USER, extra_groups=[], env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
                          cwd=str(d))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mode"] == "user"
    assert out["builds"]["honest"]["ok"] and out["builds"]["honest"]["ko"], out["builds"]["honest"]["output"]
    evil = out["builds"]["evil"]
    assert not evil["ok"] and not evil["ko"]
    assert "No such file or directory" in evil["output"]
    assert token not in proc.stdout + proc.stderr
