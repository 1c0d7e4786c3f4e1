"""What building kbridge's eBPF tools needs from the host, said before anything is built."""

from __future__ import annotations

import pytest

from kbridge.arch import ARM64, X86_64
from kbridge.errors import KbridgeError
from kbridge.images import bpftools
from kbridge.images.image import Image


def test_missing_host_tools_are_named_with_their_packages(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it: no clang, no gcc
    monkeypatch.setattr(bpftools, "_bpftool", lambda: None)
    for arch in (X86_64, ARM64):
        missing = bpftools.host_missing(arch)
        assert "clang" in missing and "bpftool" in missing and arch.gcc_package("12") in missing
    img = Image(tmp_path, ARM64, "bookworm", "6.1.0-57-arm64", "6.1.192-3")
    with pytest.raises(KbridgeError) as e:
        bpftools.ensure(img)
    assert "clang" in e.value.message and e.value.hint.startswith("sudo apt-get install")


def test_the_digest_names_the_sources(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A changed probe or loader is a new guest directory: a VM booted with the old one never runs the new.
    d = bpftools.digest()
    for name in bpftools.SOURCES:
        (tmp_path / name).write_bytes((bpftools.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(bpftools, "SOURCE_DIR", tmp_path)
    assert bpftools.digest() == d
    (tmp_path / "loader.c").write_text((tmp_path / "loader.c").read_text() + "\n")
    changed = bpftools.digest()
    assert changed != d and len(changed) == 16
    tools = bpftools.BpfTools(changed, tmp_path / "a", tmp_path / "b", tmp_path / "c")
    assert [g for g, _, _ in tools.guest_files()] == [
        f"/usr/lib/kbridge/bpf/{changed}/kbridge-bpf",
        f"/usr/lib/kbridge/bpf/{changed}/probe.bpf.o",
        f"/usr/lib/kbridge/bpf/{changed}/min.btf",
    ]


def test_bpftool_is_a_binary_not_ubuntus_wrapper(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Ubuntu before 25.04: /usr/sbin/bpftool is linux-tools-common's script, which fails unless the
    # running kernel's linux-tools are installed; linux-tools-generic's binary is the one that works.
    bindir, tools = tmp_path / "bin", tmp_path / "linux-tools"
    for d in (bindir, tools / "5.15.0-91-generic", tools / "6.8.0-40-generic"):
        d.mkdir(parents=True)
    (bindir / "bpftool").write_text('#!/bin/sh\nexec "/usr/lib/linux-tools/$(uname -r)/bpftool" "$@"\n')
    for d in ("5.15.0-91-generic", "6.8.0-40-generic"):
        (tools / d / "bpftool").write_bytes(b"\x7fELF\x02\x01\x01")
    for p in (bindir / "bpftool", *tools.glob("*/bpftool")):
        p.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(bpftools, "LINUX_TOOLS", tools)
    monkeypatch.setattr(bpftools.shutil, "which", lambda name, path=None: str(bindir / name) if path is None else None)
    assert bpftools._bpftool() == str(tools / "6.8.0-40-generic" / "bpftool")
    # Debian's package: the binary itself, on PATH.
    (bindir / "bpftool").write_bytes(b"\x7fELF\x02\x01\x01")
    assert bpftools._bpftool() == str(bindir / "bpftool")
    # The wrapper alone: missing, named as such before anything is built.
    (bindir / "bpftool").write_text("#!/bin/sh\n")
    monkeypatch.setattr(bpftools, "LINUX_TOOLS", tmp_path / "none")
    assert bpftools._bpftool() is None and "bpftool" in bpftools.host_missing(X86_64)
