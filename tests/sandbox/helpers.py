"""Fixtures: kbridge's cached guest headers, a sandbox per mode, a secret with a random token, and a
builder that runs exactly kbridge.build.kbuild_argv's command for a host-gcc kernel in the sandbox."""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kbridge import sandbox
from kbridge.arch import get_arch
from kbridge.images import image as images
from kbridge.kbuild import kbuild_argv as kbridge_kbuild_argv

HONEST_C = """\
// SPDX-License-Identifier: GPL-2.0
/* An honest lab module: says hello on load and goodbye on unload (dmesg). */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt
#include <linux/module.h>
#include <linux/kernel.h>

static int __init hello_init(void)
{
	pr_info("hello\\n");
	return 0;
}

static void __exit hello_exit(void)
{
	pr_info("bye\\n");
}

module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
"""


@dataclass(frozen=True)
class Headers:
    """One cached kbridge image's kbuild tree, with what kbuild_argv needs of the image."""

    arch: str  # kbridge's name
    tree: Path  # IMAGE/headers (usr/src/linux-headers-KREL + -common + usr/lib/linux-kbuild-X)
    krel: str
    kernel_arch: str
    cross_compile: str
    elf_machine: int
    image: images.Image

    @property
    def kbuild(self) -> Path:
        return self.tree / "usr/src" / f"linux-headers-{self.krel}"


def headers_for(arch: str, suite: str = "bookworm") -> Headers:
    """The headers of kbridge's image for ARCH and SUITE (built from Debian packages if missing)."""
    a = get_arch(arch)
    img = images.ensure(a, suite)
    return Headers(arch, img.dir / "headers", img.krel, a.kernel_arch, a.cross_compile(), a.elf_machine, img)


@pytest.fixture(params=["x86_64", "arm64"])
def headers(request: pytest.FixtureRequest) -> Headers:
    return headers_for(request.param)


@pytest.fixture
def x86() -> Headers:
    return headers_for("x86_64")


def kbuild_argv(h: Headers, moddir: Path) -> list[str]:
    """The command kbridge builds a module with (kbridge.kbuild.kbuild_argv)."""
    return kbridge_kbuild_argv(h.image, moddir)


def modes() -> list[str]:
    return sandbox.candidate_modes()


@pytest.fixture(scope="session")
def detected() -> sandbox.Sandbox:
    return sandbox.detect()  # a failure here is a failure: the tests prove the sandbox works


@pytest.fixture(scope="session", params=modes())
def box(request: pytest.FixtureRequest, detected: sandbox.Sandbox) -> sandbox.Sandbox:
    """Every mode this user can run (root: nobody and root-userns), each probed first."""
    b = dataclasses.replace(detected, mode=request.param)
    why = sandbox.probe(b)
    if why is not None:
        pytest.fail(f"mode {request.param} does not work here: {why}")
    return b


@dataclass
class Secret:
    token: str
    paths: list[Path]


@pytest.fixture
def secret(tmp_path: Path) -> Iterator[Secret]:
    """A unique token in /root/.kbridge-secret-test (the grading user's home) and in a file under
    the test's own fake home; both are removed afterwards."""
    token = "KBSECRET" + secrets.token_hex(16)
    home = tmp_path / "home"
    home.mkdir()
    paths = [home / ".kbridge-secret-test"]
    if os.geteuid() == 0:
        paths.insert(0, Path("/root/.kbridge-secret-test"))
    for p in paths:
        p.write_text(f"{token}\n")
        p.chmod(0o600)
    yield Secret(token, paths)
    for p in paths:
        p.unlink(missing_ok=True)


def write_submission(d: Path, files: dict[str, str | bytes]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return d


def build_submission(
    sub: Path,
    h: Headers,
    work: Path,
    box: sandbox.Sandbox | None = None,
    *,
    module: str = "hello",
    timeout_s: float = 120,
    max_output: int = 64 << 10,
    limits: sandbox.Limits = sandbox.Limits(),
) -> sandbox.Result:
    """What `kbridge lab check` would do: check and copy the submission, write kbridge's own Kbuild,
    build in the sandbox with kbuild_argv's command."""
    sandbox.check_tree(sub)
    sandbox.copy_submission(sub, work)
    (work / "Kbuild").write_text(f"obj-m := {module}.o\n")
    return sandbox.run(
        kbuild_argv(h, work),
        ro=[h.tree],
        rw=[work],
        cwd=work,
        env={"LC_ALL": "C"},
        timeout_s=timeout_s,
        max_output=max_output,
        limits=limits,
        box=box,
    )


def tree_bytes(d: Path) -> bytes:
    """Every file under D, concatenated (to look for a leaked token in any build product)."""
    return b"".join(p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink())
