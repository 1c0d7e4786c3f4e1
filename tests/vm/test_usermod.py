"""A user's own module in real guests: build errors, refused parameters, an oops in init,
files in and out, and the module's functions resolving for tracefs and kprobes.

The example driver's own tests (examples/chardev/test_chardev.py) cover the common path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kbridge import kbuild, modules
from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.paths import cache_dir
from kbridge.targets.base import GuestCrash
from kbridge.targets.qemu import QemuVM
from tests.vm.fetch import arg

EXAMPLE = Path(__file__).parents[2] / "examples" / "chardev"
OOPS = Path(__file__).parent / "data" / "oops_init"
WARN = Path(__file__).parent / "data" / "warn_init"
CLONE = Path(__file__).parent / "data" / "clone_args"
CACHE = cache_dir()  # before pytester moves HOME

pytest_plugins = ["pytester"]


def _leftovers(vm) -> list[str]:
    return [f for f in vm.run(["/bin/busybox", "ls", "/tmp"]).text.split() if f.startswith("kbridge-usermod-")]


def test_compiler_errors_name_the_users_file_and_line(kbridge_arch, tmp_path):
    src = tmp_path / "mydrv"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    text = (src / "kbchardev.c").read_text()
    (src / "kbchardev.c").write_text(text.replace("\tkb_rejects++;", "\tkb_rejects += nonexistent;"))
    line = (src / "kbchardev.c").read_text().splitlines().index("\tkb_rejects += nonexistent;") + 1
    with pytest.raises(KbridgeError) as e:
        kbuild.build(kbuild.source_files(src), images.ensure(get_arch(kbridge_arch)), str(src))
    # gcc's diagnostic whole, on the user's paths: the function, the column, the source line and caret.
    assert f"{src}/kbchardev.c: In function 'kbchardev_reject':" in e.value.message
    assert f"{src}/kbchardev.c:{line}:23: error: 'nonexistent' undeclared" in e.value.message
    assert f"   {line} |         kb_rejects += nonexistent;" in e.value.message
    assert "make: ***" not in e.value.message
    assert "/kbuild/" not in e.value.message  # no path of kbridge's build copy


def test_an_unchanged_module_is_not_rebuilt(kbridge_arch):
    img = images.ensure(get_arch(kbridge_arch))
    first = kbuild.pick(kbuild.build(kbuild.source_files(EXAMPLE), img, str(EXAMPLE)), str(EXAMPLE))
    stamp = first.ko.stat().st_mtime_ns
    again = kbuild.pick(kbuild.build(kbuild.source_files(EXAMPLE), img, str(EXAMPLE)), str(EXAMPLE))
    assert again.ko == first.ko and again.ko.stat().st_mtime_ns == stamp
    assert first.params == {"debug": "int", "fail_init": "bool", "greeting": "charp"}
    assert first.krel == img.krel and first.arch == kbridge_arch


def test_a_cached_builds_warnings_name_the_source_it_was_asked_for(kbridge_arch, tmp_path):
    """Builds keyed by content alone (a lab's submissions) share the cache: the second copy's
    warnings name its own path, not the first one's."""
    img = images.ensure(get_arch(kbridge_arch))
    dirs = [tmp_path / "alice" / "mydrv", tmp_path / "bob" / "mydrv"]
    for d in dirs:
        shutil.copytree(EXAMPLE, d, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        text = (d / "kbchardev.c").read_text()
        # A warning only this test's files give, so the build is this test's own (not cached before).
        unused = f"\tint kb_unused_{tmp_path.name.replace('-', '_')};\n\tkb_rejects++;"
        (d / "kbchardev.c").write_text(text.replace("\tkb_rejects++;", unused, 1))
    got = [kbuild.pick(kbuild.build(kbuild.source_files(d), img, str(d)), str(d)).warnings for d in dirs]
    for d, warnings in zip(dirs, got, strict=True):
        assert [w for w in warnings if "kb_unused_" in w], warnings
        assert all(w.startswith(f"{d}/kbchardev.c:") for w in warnings if "kb_unused_" in w), warnings
    assert not [w for w in got[1] if "alice" in w], got[1]


def test_refused_parameters_change_nothing_in_the_guest(kbridge_vm, kbridge_session):
    vm = kbridge_session.target
    before = modules.loaded_modules(vm)
    for params in ({"debug": "1 fail_init=1"}, {"greeting": "two words"}, {"verbose": 1}):
        with pytest.raises(KbridgeError):
            modules.load_module(vm, EXAMPLE, params)
    assert modules.loaded_modules(vm) == before
    assert _leftovers(vm) == []


def test_unload_refuses_the_guests_own_drivers(kbridge_session):
    with pytest.raises(KbridgeError, match="part of the guest kernel"):
        modules.unload_module(kbridge_session.target, "virtio_console")
    with pytest.raises(KbridgeError, match="is not loaded"):
        modules.unload_module(kbridge_session.target, "mydrv")
    with pytest.raises(KbridgeError, match="invalid module name"):
        modules.unload_module(kbridge_session.target, "a;reboot")


def test_push_keeps_the_mode_and_pull_brings_files_back(kbridge_vm, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text('#!/bin/sh\necho "hello from $(uname -m)" > /tmp/pulled/out.txt\n')
    script.chmod(0o755)
    kbridge_vm.run("rm -rf /tmp/pushed /tmp/pulled; mkdir /tmp/pulled")
    assert kbridge_vm.push(script, "/tmp/pushed/") == "/tmp/pushed/hello.sh"
    assert kbridge_vm.run("stat -c %a /tmp/pushed/hello.sh").text == "755\n"
    assert kbridge_vm.run(["/tmp/pushed/hello.sh"]).ok
    got = kbridge_vm.pull("/tmp/pulled/out.txt", tmp_path)
    assert got == tmp_path / "out.txt"
    assert got.read_text() == f"hello from {get_arch(kbridge_vm.arch_info).uname}\n"
    with pytest.raises(KbridgeError, match="'/tmp/nonexistent' does not exist in the guest"):
        kbridge_vm.pull("/tmp/nonexistent", tmp_path)
    kbridge_vm.run("rm -rf /tmp/pushed /tmp/pulled")


def test_module_functions_resolve_for_tracefs_and_kprobes(kbridge_vm):
    kbridge_vm.load_module(EXAMPLE)
    try:
        # tracefs takes MOD:SYM as written; $arg3 is write's count.
        count = arg(kbridge_vm.arch_info, 3)
        res = kbridge_vm.trace(f"p:kbw kbchardev:kbchardev_write count={count}:u64", run="echo hello > /dev/kbchardev")
        assert [h.args["count"] for h in res.hits] == [6]
        # A plain name that only a module defines resolves too (read live from /proc/kallsyms).
        run = kbridge_vm.probe("kbchardev_read", ret=True, run="cat /dev/kbchardev")
        assert [h.retval for h in run.hits] == [6, 0]  # "hello\n", then end of file
        # inspect plants a kprobe on the module's function and reads its bytes back.
        ins = kbridge_vm.inspect("kbchardev_reject")
        assert (ins.symbol, ins.blacklisted, ins.ftraceable) == ("kbchardev:kbchardev_reject", False, True)
        assert ins.probe_address == ins.address and ins.insn["before"] == ins.insn["after"]
    finally:
        kbridge_vm.unload_module("kbchardev")
    assert "kbchardev" not in kbridge_vm.loaded_modules()


def test_an_arg_on_a_compiler_clone_reads_the_sources_parameter(kbridge_vm):
    # gcc makes clone_target(ignored, cmd, arg) clone_target.constprop.0(cmd): every caller
    # passes ignored=0 and arg=2. The source's parameter 2 is the clone's argument 1.
    kbridge_vm.load_module(CLONE, reload=True)
    try:
        trigger = "echo 7 > /sys/module/clone_args/parameters/trigger"
        run = kbridge_vm.probe("clone_target", args={"cmd": 2}, run=trigger)
        assert run.resolution.symbol == "clone_args:clone_target.constprop.0"
        assert [h.args["cmd"] for h in run.hits] == [7]
        notes = run.results[0].notes
        assert any("parameter 2 (cmd) is its argument 1 (DWARF of clone_args.ko)" in n for n in notes), notes
        # The folded-in constant is refused before anything is loaded, with its value.
        with pytest.raises(KbridgeError, match="folded in the constant 2"):
            kbridge_vm.probe("clone_target", args={"arg": 3}, run=trigger)
    finally:
        kbridge_vm.unload_module("clone_args")


def test_a_warning_in_init_loads_an_oops_crashes(kbridge_arch):
    # An oops leaves the module half-initialised in a guest that cannot be trusted after it:
    # this runs in a VM of its own, never in the kept one the other tests share.
    img = images.ensure(get_arch(kbridge_arch))
    built = kbuild.pick(kbuild.build(kbuild.source_files(OOPS), img, str(OOPS)), str(OOPS))
    vm = QemuVM.boot(img)
    try:
        warned = modules.load_module(vm, WARN)
        assert any("WARNING: CPU:" in line for line in warned.log)
        assert "warn_init: loaded after a warning" in warned.log
        modules.unload_module(vm, "warn_init")
        assert not (vm.rundir / "crashed").exists()
        with pytest.raises(GuestCrash) as e:
            modules.load_module(vm, built)
        assert "loading oops_init crashed the guest kernel in its init" in e.value.message
        assert "about to oops" in e.value.text
        # 32-bit arm (6.1 armmp, CPU_SW_DOMAIN_PAN): address 0 is user space, closed to the kernel
        # by its domain, so the store faults as a domain fault ("Unhandled fault: page domain fault").
        cause = "page domain fault" if kbridge_arch == "arm" else "NULL pointer dereference"
        assert cause in e.value.text
        assert "oops_init_init" in e.value.text  # the backtrace names the user's function
        assert (vm.rundir / "crashed").exists()  # a kept VM in this state would be restarted
    finally:
        vm.shutdown()


def test_a_failing_test_leaves_no_module_behind(kbridge_vm, pytester, monkeypatch):
    monkeypatch.setenv("KBRIDGE_CACHE", str(CACHE))  # pytester points HOME elsewhere
    pytester.makepyfile(f"""
        def test_loads_then_fails(kbridge_vm):
            kbridge_vm.load_module({str(EXAMPLE)!r})
            assert "kbchardev" in kbridge_vm.loaded_modules()
            raise AssertionError("failing with kbchardev loaded")
    """)
    result = pytester.runpytest_inprocess("--kbridge-arch", kbridge_vm.arch, "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "failing with kbchardev loaded" in result.stdout.str()
    assert "kbchardev" not in kbridge_vm.loaded_modules()
