"""kbridge.kbuild, the one module builder: a source directory, its cache key, gcc's diagnostics, guest programs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbridge import elf, kbuild
from kbridge.arch import ARM64, X86_64
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images.image import Image

DATA = Path(__file__).parent / "data"
EXAMPLE = Path(__file__).parents[2] / "examples" / "chardev"


def image(arch=X86_64, krel="6.1.0-56-amd64") -> Image:
    return Image(Path("/nonexistent"), arch, "bookworm", krel, "6.1.158-1")


# -- source directory -------------------------------------------------------------


def test_source_files_skip_build_products(tmp_path):
    (tmp_path / "Kbuild").write_text("obj-m := drv.o\n")
    (tmp_path / "drv.c").write_text("int x;\n")
    for junk in ("drv.o", "drv.ko", ".drv.o.cmd", "drv.mod.c", "modules.order", "Module.symvers", "test_drv.py"):
        (tmp_path / junk).write_text("junk")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "helper.h").write_text("#define X 1\n")
    assert sorted(kbuild.source_files(tmp_path)) == ["Kbuild", "drv.c", "sub/helper.h"]


def test_source_needs_kbuild_or_makefile_with_obj_m(tmp_path):
    with pytest.raises(KbridgeError, match="has no Kbuild or Makefile"):
        kbuild.source_files(tmp_path)
    (tmp_path / "Makefile").write_text("all:\n\tgcc -o x x.c\n")
    with pytest.raises(KbridgeError, match="has no obj-m line") as e:
        kbuild.source_files(tmp_path)
    assert "obj-m := mydrv.o" in e.value.hint
    (tmp_path / "Makefile").write_text("obj-$(CONFIG_MYDRV) += drv.o\n")
    with pytest.raises(KbridgeError, match=r"obj-\$\(CONFIG_MYDRV\)"):
        kbuild.source_files(tmp_path)
    # The classic out-of-tree Makefile: obj-m in the kbuild half, a make -C in the other.
    (tmp_path / "Makefile").write_text(
        "obj-m += drv.o\nall:\n\tmake -C /lib/modules/$(shell uname -r)/build M=$(PWD) modules\n"
    )
    assert "Makefile" in kbuild.source_files(tmp_path)


def test_source_must_be_a_directory(tmp_path):
    with pytest.raises(KbridgeError, match="is not a directory"):
        kbuild.source_files(tmp_path / "missing")


def test_cache_key_follows_content_kernel_and_arch():
    files = kbuild.source_files(EXAMPLE)
    key = kbuild.cache_key(files, image())
    assert key == kbuild.cache_key(dict(files), image())
    assert key != kbuild.cache_key({**files, "kbchardev.c": files["kbchardev.c"] + b"\n"}, image())
    assert key != kbuild.cache_key(files, image(krel="6.1.0-57-amd64"))
    assert key != kbuild.cache_key(files, image(arch=ARM64, krel="6.1.0-56-amd64"))


# -- compiler messages, from a real failed kbuild run (arm64 cross build) ----------------


def test_compiler_errors_are_shown_whole_at_the_users_paths():
    raw = (DATA / "usermod_build_error.txt").read_text()
    shown = kbuild.map_paths(raw, Path("/tmp/kbwork"), "mydrv")
    assert "/tmp/kbwork" not in shown
    msg = kbuild.explain_build_failure(shown, "mydrv")
    assert msg.startswith("building mydrv failed:\n")
    lines = msg.splitlines()
    # gcc's own context, the error with its column, the source line and caret, as gcc printed them.
    assert lines[1] == "mydrv/kbchardev.c: In function 'kbchardev_reject':"
    assert lines[2] == "mydrv/kbchardev.c:52:21: error: expected ';' before 'undeclared_thing'"
    assert "   52 |         kb_rejects++" in lines[3]
    assert kbuild.diagnostics(shown) == [
        "mydrv/kbchardev.c:52:21: error: expected ';' before 'undeclared_thing'",
        "mydrv/kbchardev.c:25:12: warning: 'unused_var' defined but not used [-Wunused-variable]",
    ]


def test_build_failure_without_line_numbers_shows_the_output():
    out = 'ERROR: modpost: "nonexistent_fn" [/src/drv.ko] undefined!\nmake[2]: *** Error 1\n'
    msg = kbuild.explain_build_failure(out, "/src")
    assert '"nonexistent_fn" [/src/drv.ko] undefined!' in msg


def test_makes_own_chatter_is_dropped():
    out = "make[1]: Entering directory '/x'\ndrv.c:1:1: error: boom\nmake[1]: Leaving directory '/x'\n"
    assert kbuild.map_paths(out, Path("/w"), "d") == "drv.c:1:1: error: boom"


# -- guest programs ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [X86_64, ARM64])
def test_the_loader_is_a_static_program_for_the_guest(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("KBRIDGE_CACHE", str(tmp_path))
    data = kbuild.build_guest_program(GUEST_DIR / "insmod.c", image(arch)).read_bytes()
    assert elf.machine(data) == arch.elf_machine
    assert elf.interpreter(data) is None and elf.needed(data) == []  # runs in any guest
    assert kbuild.build_guest_program(GUEST_DIR / "insmod.c", image(arch)).read_bytes() == data  # cached
