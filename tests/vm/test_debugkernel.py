"""The kernel a driver developer tests on: kbridge's debug kernel (KASAN, KFENCE, lockdep, UBSAN, DWARF),
their own kernel tree, and gdb, in real guests.

tests/vm/data/kbdebug is a module with bugs on demand (write a word to /sys/kernel/debug/kbdebug/trigger).
Each bug the kernel reports fails the command that caused it, with the report's head, the module's
function and the line of kbdebug.c, and the whole report saved; the VM is kept after a KASAN report
(the kernel went on, and reports every later bug: kasan_multi_shot) and restarted after lockdep's
(which turns itself off after its first).

The debug kernel is built from Debian's linux-source-6.1 on first use (~13 min per arch on 2 cores):
these tests use it when it is in the cache, and build it only with --build-debug-kernel (otherwise they
are skipped, saying how to build it). x86_64 runs by default; arm64 carries the `matrix` marker.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import kbridge
from kbridge import kernels, sanitizers, targets
from kbridge.api import Guest
from kbridge.arch import get_arch
from kbridge.images import debugkernel
from kbridge.paths import cache_dir, state_dir
from tests.vm import cli

DATA = Path(__file__).parent / "data" / "kbdebug"
SOURCE = (DATA / "kbdebug.c").read_text().splitlines()
TRIGGER = "/sys/kernel/debug/kbdebug/trigger"
CACHE = cache_dir()  # before pytester moves HOME

pytest_plugins = ["pytester"]


def _line(marker: str, after: str = "") -> int:
    """The line of kbdebug.c holding MARKER (the first after the line holding AFTER)."""
    start = next(i for i, ln in enumerate(SOURCE) if after in ln) if after else 0
    return next(i for i, ln in enumerate(SOURCE[start:], start + 1) if marker in ln)


UAF_LINE = _line("READ_ONCE(obj->value)")
LOCK_BA_LINE = _line("mutex_lock(&lock_a); /* the inverse order")


def _arch_params() -> list:  # type: ignore[type-arg]
    return [
        pytest.param("x86_64", marks=pytest.mark.xdist_group("debug-x86_64")),
        pytest.param("arm64", marks=(pytest.mark.matrix, pytest.mark.xdist_group("debug-arm64"))),
    ]


def _image(request: pytest.FixtureRequest, arch: str) -> None:
    """The debug kernel of ARCH in the cache: built here only with --build-debug-kernel."""
    if debugkernel.load(arch) is not None:
        return
    if not request.config.getoption("--build-debug-kernel"):
        pytest.skip(
            f"the {arch} debug kernel is not built: kbridge image build --kernel debug --arch {arch} --keep-tree "
            "(~13 min), or run pytest with --build-debug-kernel"
        )
    debugkernel.ensure(arch, keep_tree=True)


@pytest.fixture(scope="module", params=_arch_params())
def debug_vm(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A Guest on a kept VM of the debug kernel, with QEMU's gdb stub, for the module's tests."""
    arch = request.param
    _image(request, arch)
    a = get_arch(arch)
    if (old := targets.kept(a, kernels.DEBUG)) is not None:
        targets.shutdown(old)  # one with the gdb stub, booted here
    targets.boot(a, kernels.DEBUG, keep=True, gdb=True).release()
    with kbridge.vm(arch, kernel="debug") as vm:
        yield vm
    if (vm_left := targets.kept(a, kernels.DEBUG)) is not None:
        targets.shutdown(vm_left)


def _trigger(arch: str, *words: str) -> subprocess.CompletedProcess[str]:
    """`kbridge vm exec` writing each of WORDS to kbdebug's trigger file."""
    script = "; ".join(f"echo {w} >{TRIGGER}" for w in words)
    return cli.run("vm", "exec", "--kernel", "debug", "--arch", arch, "--", "/bin/sh", "-c", script)


def _saved(text: str) -> Path:
    m = re.search(r"the whole report: (\S+)", text)
    assert m, text
    return Path(m[1])


def test_the_image_boots_with_kasan_multi_shot_and_loads_no_module_at_boot(debug_vm: Guest) -> None:
    """kasan_multi_shot is on the guest's command line; the initramfs's module list is empty (virtio
    is built in), so the boot printed no insmod error; the kernel has the promised checkers."""
    assert "kasan_multi_shot" in debug_vm.run(["/bin/busybox", "cat", "/proc/cmdline"]).stdout
    assert debug_vm.run(["/bin/busybox", "cat", "/etc/kbridge/modules"]).stdout == ""
    assert "can't insert" not in debug_vm.kernel_log()
    config = debug_vm.run(["/bin/busybox", "sh", "-c", "zcat /proc/config.gz"]).stdout
    for opt in ("CONFIG_KASAN=y", "CONFIG_KFENCE=y", "CONFIG_PROVE_LOCKING=y", "CONFIG_UBSAN=y"):
        assert opt in config.splitlines(), opt
    assert debug_vm.krel.endswith("-kbridge-debug") and debug_vm.flavour == "debug"


def test_a_probe_with_arguments_is_exact(debug_vm: Guest) -> None:
    run = debug_vm.probe(
        "ksys_write",
        pre=True,
        args={"fd": 1, "count": 3},
        comm="dd",
        run="dd if=/dev/zero of=/dev/null bs=7 count=3 status=none",
    )
    assert run.counts == {"pre": 3}
    assert [h.args for h in run.hits] == [{"fd": 1, "count": 7}] * 3


def test_gdb_in_batch_mode_reads_an_argument_at_a_breakpoint_in_the_users_module(
    debug_vm: Guest, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if debug_vm.arch == "arm64":
        # Measured with gdb-multiarch 13.1: add-symbol-file of the aarch64 module (a relocatable object)
        # puts the DWARF addresses of functions gcc moved to .text.unlikely (kbdebug_poke.isra.0) at .text's
        # address, where the x86_64 object's are placed right: the breakpoint lands in another function.
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="gdb places an arm64 module's .text.unlikely at .text")
        )
    debug_vm.load_module(DATA, reload=True)
    shown = cli.run("gdb", "--kernel", "debug", "--arch", debug_vm.arch, "--show")
    assert shown.returncode == 0, shown.stderr
    add = next(ln for ln in shown.stdout.splitlines() if ln.startswith("add-symbol-file"))
    assert ".debug.ko" in add and "-s .text.unlikely 0x" in add  # the copy with DWARF, every section placed
    assert "target remote " + str(state_dir()) in shown.stdout and "gdb.sock" in shown.stdout  # a Unix socket
    ready = tmp_path / "gdb-ready"
    script = tmp_path / "read-args.gdb"
    script.write_text(
        "break kbdebug_poke\n"
        f"shell touch {ready}\n"  # gdb's piped output is block-buffered: this says it is waiting
        "continue\n"
        "info args\n"
        "print *word@len\n"
        "bt 3\n"
    )
    gdb = cli.gdb_waiting("--kernel", "debug", "--arch", debug_vm.arch, "--batch", "-x", str(script), ready=ready)
    try:
        res = _trigger(debug_vm.arch, "hello")  # stops at the breakpoint until gdb detaches
        out, _ = gdb.communicate(timeout=120)
    finally:
        if gdb.poll() is None:
            gdb.kill()
    assert gdb.returncode == 0, out
    assert "Breakpoint 1, kbdebug_poke" in out, out
    assert re.search(r'word = 0x[0-9a-f]+ "hello"', out) and "len = 5" in out, out
    assert '$1 = "hello"' in out, out
    assert "kbdebug_write" in out and f"{DATA.resolve()}/kbdebug.c" in out  # the user's own source path
    assert res.returncode == 0, res.stderr  # the guest ran on after gdb detached
    assert "hello" in debug_vm.run(["/bin/busybox", "sh", "-c", "dmesg | tail -3"]).stdout


def test_a_use_after_free_fails_vm_exec_with_kasans_report_and_the_source_line(debug_vm: Guest) -> None:
    debug_vm.load_module(DATA, reload=True)
    res = _trigger(debug_vm.arch, "uaf", "uaf")  # two use-after-frees in one command
    assert res.returncode == 3, res.stderr
    assert "BUG: KASAN: use-after-free in kbdebug_uaf" in res.stderr, res.stderr
    assert "Read of size 4" in res.stderr and "in module kbdebug" in res.stderr
    assert f"{DATA.resolve()}/kbdebug.c:{UAF_LINE}" in res.stderr, res.stderr  # the module's DWARF, the user's file
    saved = _saved(res.stderr).read_text()
    last = sanitizers.strip_stamp(saved.strip().splitlines()[-1]).strip()
    assert "Freed by task" in saved and set(last) == {"="}  # the whole report, to KASAN's closing rule
    # kasan_multi_shot: the second one was reported too (without it KASAN reports a boot's first bug only).
    assert debug_vm.kernel_log().count("BUG: KASAN: use-after-free in kbdebug_uaf") == 2
    # 6.1's KASAN report turns lockdep off for the rest of the boot: the VM is restarted before the next command.
    assert "turned lockdep off" in res.stderr and "restarted by the next kbridge command" in res.stderr
    again = cli.run("vm", "exec", "--kernel", "debug", "--arch", debug_vm.arch, "--", "/bin/busybox", "true")
    assert again.returncode == 0 and "restarts now" in again.stderr, again.stderr
    assert "kbdebug was loaded in it and is not now" in again.stderr


def test_a_probe_whose_workload_hits_the_bug_fails_with_the_report_after_its_hits(debug_vm: Guest) -> None:
    debug_vm.load_module(DATA, reload=True)
    res = cli.run(
        "probe", "kbdebug:kbdebug_write", "--pre", "--arg", "count=3", "--kernel", "debug",
        "--arch", debug_vm.arch, "--run", f"echo uaf > {TRIGGER}",
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert re.search(r"pre +sh\[\d+\] cpu\d kbdebug:kbdebug_write count=4", res.stdout + res.stderr), res.stdout
    assert "BUG: KASAN: use-after-free in kbdebug_uaf" in res.stderr and f"kbdebug.c:{UAF_LINE}" in res.stderr


def test_a_bug_in_the_modules_init_fails_module_load_with_the_report(debug_vm: Guest) -> None:
    with contextlib.suppress(kbridge.GuestCrash, kbridge.KbridgeError):
        debug_vm.unload_module("kbdebug")
    res = cli.run("module", "load", str(DATA), "--param", "init_bug=uaf", "--kernel", "debug", "--arch", debug_vm.arch)
    assert res.returncode == 3, res.stderr
    assert "init made the kernel report a bug" in res.stderr, res.stderr
    assert "BUG: KASAN: use-after-free in kbdebug_uaf" in res.stderr and f"kbdebug.c:{UAF_LINE}" in res.stderr


def test_a_pytest_test_using_kbridge_vm_fails_with_the_report(
    debug_vm: Guest, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KBRIDGE_CACHE", str(CACHE))  # pytester points HOME elsewhere
    pytester.makepyfile(f"""
        def test_the_driver(kbridge_vm):
            kbridge_vm.load_module({str(DATA)!r}, reload=True)
            kbridge_vm.write_file({TRIGGER!r}, b"uaf")
    """)
    result = pytester.runpytest_inprocess(
        "--kbridge-arch", debug_vm.arch, "--kbridge-kernel", "debug", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "kbridge guest kernel report (KASAN)" in text, text  # the report's section of the failing test
    assert "BUG: KASAN: use-after-free in kbdebug_uaf" in text and f"kbdebug.c:{UAF_LINE}" in text
    assert _saved(text).is_file()


def test_two_locks_taken_in_opposite_orders_get_lockdeps_report_and_a_restart(debug_vm: Guest) -> None:
    debug_vm.load_module(DATA, reload=True)
    first = _trigger(debug_vm.arch, "ab")
    assert first.returncode == 0, first.stderr  # one order alone is legal
    res = _trigger(debug_vm.arch, "ba")
    assert res.returncode == 3, res.stderr
    assert "WARNING: possible circular locking dependency detected" in res.stderr, res.stderr
    assert "kbdebug_lock_ba" in res.stderr and "(lock_a)" in res.stderr and "(lock_b)" in res.stderr
    assert f"kbdebug.c:{LOCK_BA_LINE}" in res.stderr, res.stderr
    assert "lockdep turns itself off after its first report" in res.stderr
    again = cli.run("vm", "exec", "--kernel", "debug", "--arch", debug_vm.arch, "--", "/bin/busybox", "true")
    assert again.returncode == 0 and "restarts now" in again.stderr, again.stderr
    assert "kbdebug was loaded in it" in again.stderr


@pytest.mark.parametrize("arch", _arch_params())
def test_kernel_tree_boots_the_debug_kernels_own_build_and_probes_a_module_built_against_it(
    request: pytest.FixtureRequest, arch: str
) -> None:
    _image(request, arch)
    tree = debugkernel.kept_tree(get_arch(arch))
    if tree is None:
        pytest.skip(f"the {arch} debug kernel's tree was not kept: kbridge image build --kernel debug --keep-tree")
    try:
        built = cli.run("module", "build", str(DATA), "--arch", arch, "--kernel-tree", str(tree))
        assert built.returncode == 0, built.stderr
        assert "kbdebug.ko for 6.1" in built.stderr
        loaded = cli.run("module", "load", str(DATA), "--arch", arch, "--kernel-tree", str(tree))
        assert loaded.returncode == 0, loaded.stderr
        probe = cli.run(
            "probe", "kbdebug:kbdebug_poke", "--pre", "--arg", "len=2", "--json",
            "--arch", arch, "--kernel-tree", str(tree), "--run", f"echo hello > {TRIGGER}",
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        lines = [json.loads(ln) for ln in probe.stdout.splitlines()]
        hits = [ln for ln in lines if "handler" in ln]
        assert [h["args"] for h in hits] == [{"len": 5}], lines
        assert lines[-1]["summary"]["kernel"].endswith("-kbridge-debug")
        status = json.loads(cli.run("vm", "status", "--json").stdout)["vms"]
        assert any(v["suite"] == f"tree:{tree.resolve()}" and v["flavour"] == "tree" for v in status), status
    finally:
        cli.run("vm", "down", "--arch", arch, "--kernel-tree", str(tree))


def test_a_kernel_tree_without_what_kbridge_needs_is_refused_naming_each_option(tmp_path: Path) -> None:
    (tmp_path / ".config").write_text("CONFIG_X86_64=y\nCONFIG_MODULES=y\nCONFIG_VIRTIO_CONSOLE=m\n")
    for name in ("vmlinux", "Module.symvers"):
        (tmp_path / name).write_text("")
    (tmp_path / "include/config").mkdir(parents=True)
    (tmp_path / "include/config/kernel.release").write_text("6.1.0-mine\n")
    res = cli.run("vm", "up", "--arch", "x86_64", "--kernel-tree", str(tmp_path))
    assert res.returncode == 2, res.stderr
    first = res.stderr.splitlines()[0]
    for opt in ("CONFIG_KPROBES", "CONFIG_KPROBE_EVENTS", "CONFIG_VIRTIO_PCI", "CONFIG_DEBUG_FS"):
        assert opt in first, first
    assert "CONFIG_VIRTIO_CONSOLE" not in first  # =m will do: the initramfs loads it
    assert "Traceback" not in res.stderr
