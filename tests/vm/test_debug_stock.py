"""Debugging a module on Debian's own kernel, which needs no kernel build (these run by default): a
WARN in the user's module fails the command with the report and the module's source line, and
`kbridge gdb` stops at a breakpoint in the module and reads its arguments (the module's DWARF only:
Debian ships the kernel's in a -dbg package).

The same module (tests/vm/data/kbdebug) and the sanitizers only a debug kernel has are in
test_debugkernel.py.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import kbridge
from kbridge import kernels, targets
from kbridge.api import Guest
from kbridge.arch import get_arch
from kbridge.paths import state_dir
from tests.vm import cli

DATA = Path(__file__).parent / "data" / "kbdebug"
SOURCE = (DATA / "kbdebug.c").read_text().splitlines()
TRIGGER = "/sys/kernel/debug/kbdebug/trigger"
WARN_LINE = next(i for i, ln in enumerate(SOURCE, 1) if "WARN_ON(len != 0)" in ln)

pytestmark = pytest.mark.xdist_group("stock-gdb")


@pytest.fixture(scope="module")
def stock_vm(request: pytest.FixtureRequest, kbridge_arch: str) -> Iterator[Guest]:
    """A Guest on the kept stock VM, (re)started with QEMU's gdb stub, kbdebug loaded. A kept VM this
    worker had is replaced by one of the same image flavour (bcc under --kbridge-bcc) with the stub,
    and left running: every later command attaches to it as it would have to the other."""
    a = get_arch(kbridge_arch)
    old = targets.kept(a, kernels.DEFAULT)
    had = old is not None
    flavour = old.flavour if old is not None else "bcc" if request.config.getoption("--kbridge-bcc") else "default"
    if old is not None and old.describe().get("gdb"):
        old.release()
    else:
        if old is not None:
            targets.shutdown(old)
        targets.boot(a, kernels.DEFAULT, flavour, keep=True, gdb=True).release()
    with kbridge.vm(kbridge_arch) as vm:
        vm.load_module(DATA, reload=True)
        yield vm
        with contextlib.suppress(kbridge.KbridgeError):
            vm.unload_module("kbdebug")
    if not had and (left := targets.kept(a, kernels.DEFAULT)) is not None:
        targets.shutdown(left)


def _trigger(arch: str, word: str) -> subprocess.CompletedProcess[str]:
    """`kbridge vm exec` writing WORD to kbdebug's trigger file."""
    return cli.run("vm", "exec", "--arch", arch, "--", "/bin/sh", "-c", f"echo {word} > {TRIGGER}", timeout=600)


def test_a_warn_in_the_users_module_fails_vm_exec_with_the_report_and_keeps_the_vm(stock_vm: Guest) -> None:
    res = _trigger(stock_vm.arch, "warn")
    assert res.returncode == 3, res.stderr
    assert "WARNING: CPU:" in res.stderr and "kbdebug_warn" in res.stderr, res.stderr
    assert f"{DATA.resolve()}/kbdebug.c:{WARN_LINE}" in res.stderr, res.stderr  # the module's DWARF, the user's file
    saved = re.search(r"the whole report: (\S+)", res.stderr)
    assert saved and "---[ end trace" in Path(saved[1]).read_text()
    # The kernel went on after a WARN: the VM is kept as it is, the module still loaded.
    again = _trigger(stock_vm.arch, "hello")
    assert again.returncode == 0 and "restart" not in again.stderr, again.stderr
    assert "kbdebug" in stock_vm.loaded_modules()


def test_gdb_reads_an_argument_at_a_breakpoint_in_the_users_module_on_debians_kernel(
    stock_vm: Guest, tmp_path: Path
) -> None:
    if stock_vm.arch == "arm64":
        # gdb-multiarch 13.1 places an arm64 module's .text.unlikely (kbdebug_poke.isra.0) at .text's
        # address: the breakpoint never hits (README, "Debugging your module"). test_debugkernel.py
        # keeps that case as a strict xfail (-m matrix); here it would only cost two timeouts.
        pytest.skip("gdb places an arm64 module's .text.unlikely at .text: the breakpoint never hits")
    shown = cli.run("gdb", "--arch", stock_vm.arch, "--show", timeout=600)
    assert shown.returncode == 0, shown.stderr
    assert "linux-image-" in shown.stderr and "-dbg" in shown.stderr  # what the kernel's DWARF would take
    add = next(ln for ln in shown.stdout.splitlines() if ln.startswith("add-symbol-file"))
    assert ".debug.ko" in add and " -s .data 0x" in add
    assert f"target remote {state_dir()}" in shown.stdout and "gdb.sock" in shown.stdout  # a Unix socket
    ready = tmp_path / "gdb-ready"
    script = tmp_path / "read-args.gdb"
    script.write_text(
        f"break kbdebug_poke\nshell touch {ready}\ncontinue\ninfo args\nprint *word@len\nprint $pc\n"
    )  # gdb's piped output is block-buffered: the file says it is waiting at `continue`
    gdb = cli.gdb_waiting("--arch", stock_vm.arch, "--batch", "-x", str(script), ready=ready)
    try:
        started = time.monotonic()
        res = _trigger(stock_vm.arch, "hello")
        out, _ = gdb.communicate(timeout=120)
    finally:
        if gdb.poll() is None:
            gdb.kill()
    assert gdb.returncode == 0, out
    assert re.search(r"Breakpoint 1, (0x[0-9a-f]+ in )?kbdebug_poke", out), out
    assert re.search(r'word = 0x[0-9a-f]+ "hello"', out) and "len = 5" in out, out
    assert '$1 = "hello"' in out, out
    assert res.returncode == 0, res.stderr  # the guest ran on after gdb detached
    assert time.monotonic() - started < 120
    assert "poke hello (5 bytes)" in stock_vm.kernel_log()
