"""A user's own module, without a VM: source checks, cache keys, compiler messages, parameters,
guest paths, module symbols (from a real guest's /proc/kallsyms and /proc/modules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbridge import elf, usermod
from kbridge.arch import ARM64, X86_64
from kbridge.errors import KbridgeError
from kbridge.images.image import Image
from kbridge.symbols import SymbolError, SymbolTable
from kbridge.targets.base import KmsgRecord

DATA = Path(__file__).parent / "data"
EXAMPLE = Path(__file__).parents[2] / "examples" / "chardev"


def image(arch=X86_64, krel="6.1.0-56-amd64") -> Image:
    return Image(Path("/nonexistent"), arch, "bookworm", krel, "6.1.158-1")


class CapturedGuest:
    """Answers read_file from files captured in a real x86_64 guest with kbchardev loaded."""

    def read_file(self, path: str) -> bytes:
        name = {"/proc/kallsyms": "kallsyms-modules-x86_64.txt", "/proc/modules": "proc-modules-x86_64.txt"}[path]
        return (DATA / name).read_bytes()


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
    assert sorted(usermod.source_files(tmp_path)) == ["Kbuild", "drv.c", "sub/helper.h"]


def test_source_needs_kbuild_or_makefile_with_obj_m(tmp_path):
    with pytest.raises(KbridgeError, match="has no Kbuild or Makefile"):
        usermod.source_files(tmp_path)
    (tmp_path / "Makefile").write_text("all:\n\tgcc -o x x.c\n")
    with pytest.raises(KbridgeError, match="has no obj-m line") as e:
        usermod.source_files(tmp_path)
    assert "obj-m := mydrv.o" in e.value.hint
    (tmp_path / "Makefile").write_text("obj-$(CONFIG_MYDRV) += drv.o\n")
    with pytest.raises(KbridgeError, match=r"obj-\$\(CONFIG_MYDRV\)"):
        usermod.source_files(tmp_path)
    # The classic out-of-tree Makefile: obj-m in the kbuild half, a make -C in the other.
    (tmp_path / "Makefile").write_text(
        "obj-m += drv.o\nall:\n\tmake -C /lib/modules/$(shell uname -r)/build M=$(PWD) modules\n"
    )
    assert "Makefile" in usermod.source_files(tmp_path)


def test_source_must_be_a_directory(tmp_path):
    with pytest.raises(KbridgeError, match="is not a directory"):
        usermod.source_files(tmp_path / "missing")


def test_cache_key_follows_content_kernel_and_arch():
    files = usermod.source_files(EXAMPLE)
    key = usermod.cache_key(files, image())
    assert key == usermod.cache_key(dict(files), image())
    assert key != usermod.cache_key({**files, "kbchardev.c": files["kbchardev.c"] + b"\n"}, image())
    assert key != usermod.cache_key(files, image(krel="6.1.0-57-amd64"))
    assert key != usermod.cache_key(files, image(arch=ARM64, krel="6.1.0-56-amd64"))


# -- compiler messages, from a real failed kbuild run (arm64 cross build) ----------------


def test_compiler_errors_point_at_the_users_file():
    raw = (DATA / "usermod_build_error.txt").read_text()
    src = DATA / "usermod_broken"
    shown = usermod.map_paths(raw, Path("/tmp/kbwork"), src)
    assert "/tmp/kbwork" not in shown
    msg = usermod.explain_build_failure(shown, src)
    assert msg.startswith(f"building the module in {str(src)!r} failed:\n")
    assert f"{src}/kbchardev.c:52: error: expected ';' before 'undeclared_thing'" in msg
    assert "    52 | kb_rejects++" in msg  # the user's own line, read from the user's file
    assert "warning" not in msg  # errors only when there are errors
    warnings = [d for d in usermod.diagnostics(shown, src) if " warning: " in d]
    assert warnings == [
        f"{src}/kbchardev.c:25: warning: 'unused_var' defined but not used "
        "[-Wunused-variable]\n    25 | static int unused_var;"
    ]


def test_build_failure_without_line_numbers_shows_the_end_of_the_output():
    out = 'ERROR: modpost: "nonexistent_fn" [/src/drv.ko] undefined!\nmake[2]: *** Error 1\n'
    msg = usermod.explain_build_failure(out, Path("/src"))
    assert '"nonexistent_fn" [/src/drv.ko] undefined!' in msg


# -- parameters ---------------------------------------------------------------------------

DECLARED = {
    "debug": "int",
    "fail_init": "bool",
    "greeting": "charp",
    "mask": "hexint",
    "ports": "array of ushort",
    "level": "byte",
    "inv": "invbool",
}


@pytest.mark.parametrize(
    ("params", "argv"),
    [
        ({"debug": 1}, ["debug=1"]),
        ({"debug": "-3"}, ["debug=-3"]),
        ({"debug": "0x10"}, ["debug=16"]),
        ({"fail_init": True, "inv": "no"}, ["fail_init=Y", "inv=N"]),
        ({"fail_init": "1"}, ["fail_init=1"]),
        ({"greeting": "hi,there:1"}, ["greeting=hi,there:1"]),
        ({"mask": 255}, ["mask=0xff"]),
        ({"ports": [80, 443]}, ["ports=80,443"]),
        ({"ports": "80,443"}, ["ports=80,443"]),
        ({"level": 255}, ["level=255"]),
    ],
)
def test_valid_parameters(params, argv):
    assert usermod.validate_params(params, DECLARED, "drv") == argv


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"nope": 1}, "module drv has no parameter 'nope'"),
        ({"de bug": 1}, "invalid parameter name 'de bug'"),
        ({"debug": "1 fail_init=1"}, "invalid value '1 fail_init=1' for parameter debug (int)"),
        ({"debug": 1 << 31}, "invalid value 2147483648 for parameter debug (int)"),
        ({"debug": True}, "invalid value True for parameter debug (int)"),
        ({"debug": 1.5}, "invalid value 1.5 for parameter debug (int)"),
        ({"level": -1}, "invalid value -1 for parameter level (byte)"),
        ({"fail_init": "maybe"}, "invalid value 'maybe' for parameter fail_init (bool)"),
        ({"greeting": "a b"}, "invalid value 'a b' for parameter greeting (charp)"),
        ({"greeting": 'x"y'}, "invalid value 'x\"y' for parameter greeting (charp)"),
        ({"greeting": "x\ny"}, "invalid value 'x\\ny' for parameter greeting (charp)"),
        ({"greeting": "x" * 1025}, "value for parameter greeting is 1025 characters long"),
        ({"ports": [80, 70000]}, "invalid value 70000 for parameter ports (ushort)"),
    ],
)
def test_invalid_parameters_are_quoted(params, message):
    with pytest.raises(KbridgeError) as e:
        usermod.validate_params(params, DECLARED, "drv")
    assert e.value.message.startswith(message)


def test_unknown_parameter_lists_the_declared_ones():
    with pytest.raises(KbridgeError) as e:
        usermod.validate_params({"dbg": 1}, {"debug": "int"}, "drv")
    assert e.value.hint == "its parameters (module_param): debug (int)"


def test_parse_param():
    assert usermod.parse_param("debug=1") == ("debug", "1")
    assert usermod.parse_param("s=a=b") == ("s", "a=b")
    for bad in ("debug", "=1", ""):
        with pytest.raises(KbridgeError, match="expected NAME=VALUE"):
            usermod.parse_param(bad)


# -- the load's kernel log and its failures ----------------------------------------------


def rec(text: str, seq: int = 0) -> KmsgRecord:
    return KmsgRecord(6, seq, seq * 1000, text)


def test_the_log_of_a_step_is_what_lies_between_its_markers():
    stream = iter(
        [
            rec("old: backlog"),
            rec("kbridge: insmod x 1 start"),
            None,
            rec("x: hello"),
            rec("x: ready"),
            rec("kbridge: insmod x 1 end"),
            rec("later"),
        ]
    )
    got: list[KmsgRecord] = []
    usermod._collect(stream, "kbridge: insmod x 1 start", "kbridge: insmod x 1 end", got)
    assert [r.text for r in got] == ["x: hello", "x: ready"]


def test_failed_init_names_the_errno_and_shows_the_log():
    e = usermod._load_error("drv", 19, "", ["drv: no hardware"], left=False)
    assert e.errno == "ENODEV"
    assert e.message == (
        "loading module drv failed: its init function returned -ENODEV (No such device)\n"
        "kernel log of the load:\n  drv: no hardware"
    )
    assert "nothing of it stayed loaded" in e.hint


def test_loader_errors_are_told_apart_from_init_errors():
    e = usermod._load_error("drv", 2, "", ["drv: Unknown symbol foo (err -2)"], left=False)
    assert e.errno == "ENOENT"
    assert "does not export" in e.message
    e = usermod._load_error("drv", 8, "", [], left=True)
    assert "(the kernel logged nothing)" in e.message and "still listed in /proc/modules" in e.message


# -- guest paths ------------------------------------------------------------------------


def test_guest_paths():
    assert usermod.guest_path("/tmp/client", writing=True) == "/tmp/client"
    assert usermod.guest_path("/tmp/bin/", writing=True) == "/tmp/bin/"
    assert usermod.guest_path("/proc/kallsyms", writing=False) == "/proc/kallsyms"
    for bad, what in [
        ("tmp/x", "invalid guest path"),
        ("/tmp/../etc/x", "has '..' in it"),
        ("/tmp/a\nb", "invalid guest path"),
        ("/proc/sys/kernel/x", "kernel interface"),
        ("/dev/kbchardev", "kernel interface"),
        ("/sys", "kernel interface"),
    ]:
        with pytest.raises(KbridgeError, match=what):
            usermod.guest_path(bad, writing=True)


# -- module symbols (captured from a guest with kbchardev loaded) ----------------------------


def test_loaded_modules_flags_out_of_tree_ones():
    mods = usermod.loaded_modules(CapturedGuest())  # type: ignore[arg-type]
    assert mods["kbchardev"] == "OE"
    assert mods["virtio_console"] == ""


def test_module_symbols_resolve():
    guest = CapturedGuest()
    kernel = SymbolTable.parse((DATA / "kallsyms-modules-x86_64.txt").read_text())
    res = usermod.resolve_module_symbol(guest, "kbchardev_write", kernel)  # type: ignore[arg-type]
    assert (res.symbol, res.address, res.note) == (
        "kbchardev:kbchardev_write",
        0xFFFFFFFFC0219000,
        "kbchardev_write is in module kbchardev",
    )
    res = usermod.resolve_module_symbol(guest, "kbchardev:kbchardev_reject")  # type: ignore[arg-type]
    assert (res.symbol, res.address) == ("kbchardev:kbchardev_reject", 0xFFFFFFFFC021919F)
    assert usermod.resolve_module_symbol(guest, "ksys_write") is None  # type: ignore[arg-type]


def test_a_name_in_two_modules_must_be_qualified():
    with pytest.raises(SymbolError) as e:
        usermod.resolve_module_symbol(CapturedGuest(), "cleanup_module")  # type: ignore[arg-type]
    assert e.value.message == "'cleanup_module' is not unique: it is in kbchardev, virtio_console"
    assert "MODULE:FUNCTION" in e.value.hint
    res = usermod.resolve_module_symbol(CapturedGuest(), "virtio_console:cleanup_module")  # type: ignore[arg-type]
    assert res.address == 0xFFFFFFFFC023385D


def test_module_symbol_errors():
    guest = CapturedGuest()
    with pytest.raises(SymbolError, match="module 'mydrv' in 'mydrv:f' is not loaded"):
        usermod.resolve_module_symbol(guest, "mydrv:f")  # type: ignore[arg-type]
    with pytest.raises(SymbolError, match="module kbchardev has no function 'kb_len'"):
        usermod.resolve_module_symbol(guest, "kbchardev:kb_len")  # type: ignore[arg-type]  # data, not text
    for bad in ("a b:f", "m:1f", ":f"):
        with pytest.raises(SymbolError, match="expected MODULE:FUNCTION"):
            usermod.split_module_symbol(bad)


# -- the guest's loader ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", [X86_64, ARM64])
def test_the_loader_is_a_static_program_for_the_guest(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("KBRIDGE_CACHE", str(tmp_path))
    data = usermod.build_loader(image(arch)).read_bytes()
    machine = int.from_bytes(data[18:20], "little")  # e_machine
    assert machine == {"x86_64": 62, "arm64": 183}[arch.name]  # EM_X86_64, EM_AARCH64
    assert elf.interpreter(data) is None and elf.needed(data) == []  # runs in any guest
    assert usermod.build_loader(image(arch)).read_bytes() == data  # cached
