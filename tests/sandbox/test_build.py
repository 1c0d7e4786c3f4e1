"""Honest modules build in the sandbox, exactly as kbridge builds them outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kbridge import kbuild, sandbox
from tests.sandbox.helpers import (
    HONEST_C,
    Headers,
    build_submission,
    headers_for,
    kbuild_argv,
    write_submission,
)


def check_ko(ko: Path, h: Headers) -> None:
    data = ko.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert int.from_bytes(data[18:20], "little") == h.elf_machine
    assert f"vermagic={h.krel} ".encode() in data  # what kbridge.build.check_vermagic reads


def test_honest_module_builds(tmp_path: Path, headers: Headers, box: sandbox.Sandbox) -> None:
    sub = write_submission(tmp_path / "sub", {"hello.c": HONEST_C})
    work = tmp_path / "work"
    res = build_submission(sub, headers, work, box)
    assert res.ok, res.output
    assert res.mode == box.mode
    check_ko(work / "hello.ko", headers)
    # The caller gets its build directory back (mode "nobody" lent it to uid 65534).
    import os

    assert all(p.stat().st_uid == os.geteuid() for p in [work, *work.iterdir()])


def test_same_ko_as_the_plain_build(tmp_path: Path, x86: Headers) -> None:
    """The sandbox changes where the build runs, not what it produces: kbridge's command, run plainly
    and in the sandbox in the same directory, makes the same .ko byte for byte."""
    work = tmp_path / "work"
    kos = []
    for sandboxed in (False, True):
        if work.exists():
            subprocess.run(["rm", "-rf", str(work)], check=True)
        write_submission(work, {"hello.c": HONEST_C, "Kbuild": "obj-m := hello.o\n"})
        if sandboxed:
            res = sandbox.run(
                kbuild_argv(x86, work), ro=[x86.tree], rw=[work], cwd=work, env={"LC_ALL": "C"},
                timeout_s=120, max_output=1 << 16,
            )  # fmt: skip
            assert res.ok, res.output
        else:
            subprocess.run(
                kbuild_argv(x86, work), check=True, capture_output=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}
            )
        kos.append((work / "hello.ko").read_bytes())
    assert kos[0] == kos[1]


def test_kbridge_builds_a_submission_in_the_sandbox(
    headers: Headers, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """kbridge.kbuild.build(..., untrusted=True), the path `lab check` takes: a .ko for the guest."""
    monkeypatch.setattr(kbuild, "cache_dir", lambda: tmp_path / "cache")  # not an earlier build's result
    files = {"hello.c": HONEST_C.encode(), "Kbuild": b"obj-m := hello.o\n"}
    (built,) = kbuild.build(files, headers.image, "sub", untrusted=True)
    check_ko(built.debug_ko, headers)
    assert built.ko.stat().st_size < built.debug_ko.stat().st_size  # stripped, in the sandbox too


def test_a_build_root_kernel_builds_in_the_sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """trixie's kernel needs its own gcc-14: kbridge's build root is the sandbox's /usr, the headers
    and the module at kbridge.images.buildroot's fixed paths."""
    h = headers_for("x86_64", "trixie")
    files = {"hello.c": HONEST_C.encode(), "Kbuild": b"obj-m := hello.o\n"}
    out = tmp_path / "cache"
    monkeypatch.setattr(kbuild, "cache_dir", lambda: out)
    (built,) = kbuild.build(files, h.image, "sub", untrusted=True)
    check_ko(built.debug_ko, h)
    assert b"/kb/mod" in built.debug_ko.read_bytes()  # built at the fixed path inside the root
