"""A driver bug that oopses the guest, met where a developer meets it: in `kbridge vm exec`, in a
probe's workload, in a pytest test. Each time kbridge shows the kernel's own RIP/pc line with
[kbring] and the line of kbring.c, saves the whole report, keeps the crashed VM until a command
needs it, and then says that kbring was lost with the restart.

tests/vm/data/kbring: a misc device whose KBRING_OOPS ioctl dereferences NULL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kbridge.api import Guest
from kbridge.paths import cache_dir
from tests.vm import cli

DATA = Path(__file__).parent / "data" / "kbring"
CLIENT = "/tmp/kbring_client"
LINE = next(i for i, ln in enumerate((DATA / "kbring.c").read_text().splitlines(), 1) if "faults:" in ln)
CACHE = cache_dir()  # before pytester moves HOME

pytest_plugins = ["pytester"]


def _armed(vm: Guest, tmp_path: Path) -> None:
    """kbring loaded in VM and its client pushed: the next KBRING_OOPS ioctl crashes the guest."""
    cc = vm.arch_info.gcc(12)  # gcc-12, aarch64-linux-gnu-gcc-12, arm-linux-gnueabihf-gcc-12
    if shutil.which(cc) is None:
        pytest.fail(f"{cc} is missing: the README's install line provides it")
    out = tmp_path / "kbring_client"
    subprocess.run([cc, "-static", "-O2", "-o", str(out), str(DATA / "kbring_client.c")], check=True)
    vm.load_module(DATA, reload=True)
    vm.push(out, CLIENT)
    assert vm.run([CLIENT, "ping"]).ok


def _assert_reported(text: str, arch: str) -> Path:
    """TEXT shows the kernel's faulting line in kbring and the user's source line; the saved report's path."""
    # x86_64 names the faulting function in its RIP line, arm64 in "pc :", 32-bit arm in "PC is at".
    site = {"x86_64": "RIP: 0010:kbring_ioctl+0x", "arm": "PC is at kbring_ioctl+0x"}.get(arch, "pc : kbring_ioctl+0x")
    assert site in text and "[kbring]" in text, text
    assert f"kbring.c:{LINE}" in text, text  # mapped through the module's DWARF
    assert "kb_" not in text.split("[kbring]")[0].splitlines()[-1]  # blamed on kbring, never kbridge's module
    saved = re.search(r"the whole report: (\S+)", text)
    assert saved, text
    path = Path(saved[1])
    assert (
        path.is_file()
        and site in path.read_text()
        # 32-bit arm's backtrace has no header: its frames read "FUNC [MOD] from CALLER+0x...".
        and {"arm": "kbring_ioctl [kbring] from "}.get(arch, "Call trace") in path.read_text().replace("Trace", "trace")
    )
    return path


def _assert_restarted_without_kbring(arch: str) -> None:
    """`vm status` keeps the crashed VM and names its report; the next command restarts it and says kbring is gone."""
    status = cli.run("vm", "status")
    assert status.returncode == 0 and "its kernel crashed" in status.stderr, status.stderr
    listed = json.loads(cli.run("vm", "status", "--json").stdout)["vms"]
    assert any(v["arch"] == arch and v.get("crashed") for v in listed)
    again = cli.run("vm", "exec", "--arch", arch, "--", "/bin/busybox", "true")
    assert again.returncode == 0, again.stderr
    assert "had crashed" in again.stderr and "kbring was loaded in it and is not now" in again.stderr, again.stderr


def test_an_oops_in_vm_exec_is_shown_saved_and_the_restart_says_what_was_lost(
    kbridge_vm: Guest, tmp_path: Path
) -> None:
    _armed(kbridge_vm, tmp_path)
    res = cli.run("vm", "exec", "--arch", kbridge_vm.arch, "--", CLIENT, "oops")
    assert res.returncode == 3, res.stderr
    _assert_reported(res.stderr, kbridge_vm.arch)
    _assert_restarted_without_kbring(kbridge_vm.arch)


def test_an_oops_in_a_probes_workload_blames_the_users_module(kbridge_vm: Guest, tmp_path: Path) -> None:
    _armed(kbridge_vm, tmp_path)
    res = cli.run("probe", "kbring_ioctl", "--pre", "--arch", kbridge_vm.arch, "--run", f"{CLIENT} oops")
    assert res.returncode == 3, res.stderr
    _assert_reported(res.stderr, kbridge_vm.arch)
    assert "in module kbring" in res.stderr
    _assert_restarted_without_kbring(kbridge_vm.arch)


def test_an_oops_in_a_pytest_test_is_in_its_report(
    kbridge_vm: Guest, tmp_path: Path, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KBRIDGE_CACHE", str(CACHE))  # pytester points HOME elsewhere
    _armed(kbridge_vm, tmp_path)
    pytester.makepyfile(f"""
        def test_the_driver(kbridge_vm):
            kbridge_vm.run([{CLIENT!r}, "oops"])
    """)
    result = pytester.runpytest_inprocess("--kbridge-arch", kbridge_vm.arch, "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "kbridge guest crash" in text  # the report section of the failing test
    _assert_reported(text, kbridge_vm.arch)
    _assert_restarted_without_kbring(kbridge_vm.arch)
