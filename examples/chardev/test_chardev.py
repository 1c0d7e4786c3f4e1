"""Integration tests of the kbchardev driver, in real x86_64, arm64 (and 32-bit arm) guest kernels.

Only kbridge's public API: the `kbridge_vm` fixture (a guest kept for the test
session), `load_module`, `push`, `run`, `probe`, `unload_module`. Run them with

    pytest examples/chardev                         # x86_64 and arm64
    pytest examples/chardev --kbridge-arch arm64    # one
    pytest examples/chardev --kbridge-arch arm      # 32-bit arm
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLIENT = "/tmp/kbchardev-client"

pytestmark = pytest.mark.vm


def compiler(vm) -> str:
    """A C compiler for static user-space programs of the guest's arch (Debian: gcc-12, or its
    cross build: aarch64-linux-gnu-gcc-12, arm-linux-gnueabihf-gcc-12)."""
    info = vm.arch_info
    if path := shutil.which(info.gcc(12)):
        return path
    pytest.fail(
        f"no compiler for static {vm.arch} programs: sudo apt-get install {info.gcc_package(12)} "
        f"{info.libc_dev_package()}"
    )


@pytest.fixture(scope="session")
def client(kbridge_vm, tmp_path_factory) -> str:
    """The user-space client, built static for the guest's arch and pushed into it."""
    out = tmp_path_factory.mktemp(f"client-{kbridge_vm.arch}") / "kbchardev-client"
    subprocess.run(
        [compiler(kbridge_vm), "-static", "-O2", "-Wall", "-o", str(out), str(HERE / "client.c")], check=True
    )
    return kbridge_vm.push(out, CLIENT)


@pytest.fixture
def chardev(kbridge_vm) -> Iterator[object]:
    """kbchardev loaded (debug on) for one test, unloaded after it even when the test fails."""
    mod = kbridge_vm.load_module(HERE, params={"debug": 1, "greeting": "hello"})
    try:
        yield mod
    finally:
        if "kbchardev" in kbridge_vm.loaded_modules():
            kbridge_vm.unload_module("kbchardev")


def test_load_logs_and_creates_the_device(kbridge_vm, chardev):
    assert "kbchardev: ready: /dev/kbchardev, debug=1" in chardev.log
    assert kbridge_vm.run("cat /dev/kbchardev").text == "hello"


def test_client_write_read_ioctl(kbridge_vm, chardev, client):
    assert kbridge_vm.run([client, "write", "kprobes!"]).text == "wrote 8\n"
    assert kbridge_vm.run([client, "len"]).text == "len 8\n"
    assert kbridge_vm.run([client, "read"]).text == "read 8: kprobes!\n"
    assert kbridge_vm.run([client, "clear"]).ok
    assert kbridge_vm.run([client, "len"]).text == "len 0\n"


def test_kretprobe_on_write_returns_the_length(kbridge_vm, chardev, client):
    run = kbridge_vm.probe(
        "kbchardev_write", ret=True, args={"count": 3}, run=f"echo hi > /dev/kbchardev; {client} write hello"
    )
    rets = [h for h in run.hits if h.handler == "ret"]
    assert [(h.args["count"], h.retval) for h in rets] == [(3, 3), (5, 5)]  # "hi\n", then "hello"
    assert rets[1].comm == "kbchardev-clien"  # a task's comm keeps 15 characters
    assert run.counts["ret"] == 2


def test_kprobe_on_the_error_path(kbridge_vm, chardev, client):
    run = kbridge_vm.probe("kbchardev_reject", pre=True, args={"count": 1}, run=f"{client} fill 100; {client} fill 64")
    assert [h.args["count"] for h in run.hits] == [100]  # 64 fits: no second rejection
    assert run.counts["pre"] == 1
    assert "write: No space left on device" in run.result.workload_output


def test_failed_init_leaves_nothing(kbridge_vm):
    from kbridge.modules import LoadError

    with pytest.raises(LoadError) as e:
        kbridge_vm.load_module(HERE, params={"fail_init": 1})
    assert e.value.errno == "ENODEV"
    assert e.value.log == ["kbchardev: fail_init is set: refusing to load"]  # init ran once
    assert "kbchardev" not in kbridge_vm.loaded_modules()
    assert not kbridge_vm.run("ls /dev/kbchardev").ok


def test_unload_leaves_nothing(kbridge_vm, client):
    files = kbridge_vm.run("ls -a /tmp").text.split()
    kbridge_vm.load_module(HERE)
    kbridge_vm.run([client, "fill", "65"])
    kbridge_vm.unload_module("kbchardev")
    assert "kbchardev" not in kbridge_vm.loaded_modules()
    assert not kbridge_vm.run("ls /dev/kbchardev").ok
    assert "kbchardev" not in kbridge_vm.kprobes_list()
    assert kbridge_vm.run("ls -a /tmp").text.split() == files
