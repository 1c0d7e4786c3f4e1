"""A fresh VM restored from the saved state of a booted guest: exact, invalidated, and never worse than a boot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kbridge.arch import get_arch
from kbridge.images import image as images
from kbridge.targets.qemu import QemuVM, snapshot
from kbridge.targets.qemu.argv import qemu_argv

pytestmark = pytest.mark.vm


def _boot(arch: str) -> tuple[QemuVM, bool]:
    """A fresh ephemeral VM and whether it was restored (QEMU started with -incoming)."""
    vm = QemuVM.boot(images.ensure(get_arch(arch)))
    return vm, b"-incoming" in Path(f"/proc/{vm.proc.pid}/cmdline").read_bytes().split(b"\0")


def test_restore_then_corrupt_state_boots_and_saves_again(
    kbridge_arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KBRIDGE_ACCEL", "tcg")
    monkeypatch.setattr(snapshot, "root", lambda: tmp_path)  # this test's states only
    vm, restored = _boot(kbridge_arch)  # nothing saved yet: a boot, then the state is saved
    vm.shutdown()
    assert not restored
    saved = list(tmp_path.glob("*/*.zst"))
    assert len(saved) == 1
    vm, restored = _boot(kbridge_arch)
    try:
        assert restored
        # The guest works and its clock is the host's, not the one at the save.
        res = vm.run(["/bin/sh", "-c", "date +%s; echo ok > /tmp/x; cat /tmp/x"])
        guest_now, text = res.text.split("\n", 1)
        assert abs(int(guest_now) - time.time()) < 3 and text.strip() == "ok"
        assert vm.run(["/sbin/insmod", "/nonexistent.ko"]).exitcode != 0  # the agent runs programs
    finally:
        vm.shutdown()
    saved[0].write_bytes(saved[0].read_bytes()[: 1 << 20])  # a truncated state: QEMU cannot load it
    vm, restored = _boot(kbridge_arch)
    try:
        assert not restored, "a broken state must give a normal boot"
        assert vm.run(["/bin/true"]).ok
    finally:
        vm.shutdown()
    again = list(tmp_path.glob("*/*.zst"))
    assert len(again) == 1 and again[0].stat().st_size > 1 << 20  # saved afresh after that boot


def test_key_changes_with_the_command_line_not_the_socket_paths(
    kbridge_arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "root", lambda: tmp_path)

    img = images.ensure(get_arch(kbridge_arch))
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    ka = snapshot.key(qemu_argv(img.arch, img, "tcg", a), img, a)
    assert ka == snapshot.key(qemu_argv(img.arch, img, "tcg", b), img, b)
    assert ka != snapshot.key(qemu_argv(img.arch, img, "tcg", a, memory_mb=2048), img, a)
    assert ka != snapshot.key(qemu_argv(img.arch, img, "tcg", a, cmdline_extra="nokaslr"), img, a)


def test_key_changes_with_the_image(kbridge_arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import shutil

    monkeypatch.setattr(snapshot, "root", lambda: tmp_path)
    img = images.ensure(get_arch(kbridge_arch))
    copy = tmp_path / "image"
    copy.mkdir()
    for name in ("manifest.json", "kernel", "initramfs.cpio"):
        shutil.copy2(img.dir / name, copy / name)
    mine = dataclasses.replace(img, dir=copy)
    run = tmp_path / "run"
    before = snapshot.key(qemu_argv(mine.arch, mine, "tcg", run), mine, run)
    with open(mine.initramfs, "ab") as f:
        f.write(b"\0" * 512)  # a rebuilt initramfs the manifest would not know yet
    assert snapshot.key(qemu_argv(mine.arch, mine, "tcg", run), mine, run) != before
