"""The debug kernel, a user's kernel tree and gdb, offline: kernel keys, the tree's .config check, the
debug kernel's recipe, the QEMU command line with the gdb stub, gdb's commands for a module, and the
module build cache keyed by the kernel build itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kbridge import debugger, kbuild, kernels
from kbridge.arch import ARM64, X86_64
from kbridge.errors import KbridgeError
from kbridge.images import debugkernel, kerneltree
from kbridge.images.image import Image
from kbridge.images.kconfig import parse_config
from kbridge.images.modtree import module_list
from kbridge.targets.qemu.argv import qemu_argv

DATA = Path(__file__).parent / "data"


# -- kernel keys ---------------------------------------------------------------------------


def test_debug_and_a_tree_are_kernel_keys_beside_the_suites(tmp_path: Path) -> None:
    assert kernels.resolve("debug") == kernels.resolve("DEBUG") == "debug"
    assert kernels.resolve("6.1") == "bookworm" and kernels.resolve(None) == "bookworm"
    assert kernels.resolve(None, str(tmp_path)) == f"tree:{tmp_path.resolve()}"
    assert kernels.suite_of("debug") == kernels.suite_of(f"tree:{tmp_path}") == "bookworm"
    assert kernels.suite_of("trixie") == "trixie" and kernels.is_debian("sid") and not kernels.is_debian("debug")
    assert kernels.get("debug").name == "bookworm"  # its userspace, compiler and tracefs table
    assert kernels.slug(f"tree:{tmp_path}").startswith("tree-") and "/" not in kernels.slug(f"tree:{tmp_path}")
    assert kernels.up_hint("arm64", "debug") == "kbridge vm up --arch arm64 --kernel debug"
    assert kernels.version_of("debug") == (6, 1)


def test_a_tree_version_is_read_from_its_release(tmp_path: Path) -> None:
    (tmp_path / "include/config").mkdir(parents=True)
    (tmp_path / "include/config/kernel.release").write_text("6.8.0-rc3-mine+\n")
    assert kernels.version_of(kernels.resolve(None, tmp_path)) == (6, 8)


@pytest.mark.parametrize(
    ("kernel", "tree", "quoted"),
    [
        ("6.1", "/tmp", "--kernel '6.1' and --kernel-tree '/tmp'"),
        (None, "/no/such/dir", "--kernel-tree '/no/such/dir' is not a directory"),
        ("debugg", None, "unknown kernel 'debugg'"),
        (None, "bad\nname", "invalid --kernel-tree 'bad\\nname'"),
    ],
)
def test_bad_kernel_choices_are_one_line_quoting_them(kernel: str | None, tree: str | None, quoted: str) -> None:
    with pytest.raises(KbridgeError) as e:
        kernels.resolve(kernel, tree)
    assert quoted in e.value.message and "\n" not in e.value.message


# -- a tree's .config ----------------------------------------------------------------------

GOOD = {n.option: "y" for n in kerneltree.NEEDS if n.arch in (None, "x86_64") and n.required}


def test_a_tree_with_what_kbridge_needs_passes_with_warnings_for_the_optional() -> None:
    warnings = kerneltree.check_config({**GOOD, "CONFIG_VIRTIO_CONSOLE": "m"}, X86_64, "kernel tree /t")
    assert any("CONFIG_BPF_SYSCALL" in w for w in warnings)


def test_every_missing_option_is_named_in_one_line() -> None:
    config = {k: v for k, v in GOOD.items() if k not in ("CONFIG_KPROBES", "CONFIG_DEBUG_FS")}
    config["CONFIG_KRETPROBES"] = "m"  # not a module option: =m is as good as missing
    with pytest.raises(KbridgeError) as e:
        kerneltree.check_config({**config, "CONFIG_MODULE_SIG_FORCE": "y"}, X86_64, "kernel tree /t")
    msg = e.value.message
    assert "\n" not in msg and msg.startswith("kernel tree /t lacks ")
    for opt in (
        "CONFIG_KPROBES (not set",
        "CONFIG_DEBUG_FS (not set",
        "CONFIG_KRETPROBES (=m",
        "CONFIG_MODULE_SIG_FORCE",
    ):
        assert opt in msg, msg
    assert "-e KPROBES" in (e.value.hint or "") and "-d MODULE_SIG_FORCE" in (e.value.hint or "")


def test_arm64_trees_need_the_virt_machines_console_and_pci_bridge() -> None:
    x86_only = {**GOOD}
    with pytest.raises(KbridgeError) as e:
        kerneltree.check_config(x86_only, ARM64, "kernel tree /t")
    assert "CONFIG_SERIAL_AMBA_PL011_CONSOLE" in e.value.message and "CONFIG_PCI_HOST_GENERIC" in e.value.message
    assert "CONFIG_SERIAL_8250_CONSOLE" not in e.value.message


def test_a_kasan_tree_boots_its_bzimage_unless_its_pvh_entry_is_fixed(tmp_path: Path) -> None:
    config = {"CONFIG_PVH": "y", "CONFIG_KASAN": "y"}
    assert kerneltree.boot_file(tmp_path, X86_64, config, pvh_safe=False) == (tmp_path / "arch/x86/boot/bzImage", False)
    assert kerneltree.boot_file(tmp_path, X86_64, config, pvh_safe=True) == (tmp_path / "vmlinux", True)
    assert kerneltree.boot_file(tmp_path, X86_64, {"CONFIG_PVH": "y"}, pvh_safe=False) == (tmp_path / "vmlinux", True)
    assert kerneltree.boot_file(tmp_path, ARM64, config, pvh_safe=True) == (tmp_path / "arch/arm64/boot/Image", False)
    assert kerneltree.cmdline(config) == "kasan_multi_shot" and kerneltree.cmdline({}) == ""


# -- the debug kernel's recipe --------------------------------------------------------------


def test_the_arm64_fragment_drops_the_x86_machine_and_adds_the_virt_machines() -> None:
    x86 = parse_config(debugkernel.fragment_for(X86_64))
    arm = parse_config(debugkernel.fragment_for(ARM64))
    assert x86["CONFIG_PVH"] == "y" and "CONFIG_PVH" not in arm and "CONFIG_ACPI" not in arm
    assert arm["CONFIG_SERIAL_AMBA_PL011_CONSOLE"] == "y" and "CONFIG_SERIAL_AMBA_PL011_CONSOLE" not in x86
    for promised in debugkernel.PROMISES:
        assert arm.get(promised) == x86.get(promised) == "y", promised
    assert debugkernel.recipe(X86_64) != debugkernel.recipe(ARM64)


def test_options_kconfig_dropped_are_named() -> None:
    fragment = 'CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n# CONFIG_D is not set\nCONFIG_E="x"\n'
    lost = debugkernel.unstuck(fragment, {"CONFIG_A": "y", "CONFIG_D": "y", "CONFIG_E": "x"})
    assert lost == ["CONFIG_B=y (got unset)", "CONFIG_D=n (got y)"]


def test_an_image_without_boot_modules_lists_none() -> None:
    """The guest init reads /etc/kbridge/modules line by line: one empty line was an insmod '' error."""
    assert module_list([]) == b""
    assert module_list(["/lib/modules/k/a.ko", "/lib/modules/k/b.ko"]) == b"/lib/modules/k/a.ko\n/lib/modules/k/b.ko\n"


# -- QEMU and gdb ---------------------------------------------------------------------------


def test_the_gdb_stub_is_a_unix_socket_and_the_images_arguments_come_along(tmp_path: Path) -> None:
    img = Image(Path("/img"), X86_64, "bookworm", "6.1.192-kbridge-debug", "1", "debug", "debug", "kasan_multi_shot")
    plain = qemu_argv(X86_64, img, "tcg", tmp_path)
    assert "kasan_multi_shot" in plain[plain.index("-append") + 1] and "-gdb" not in plain
    argv = qemu_argv(X86_64, img, "tcg", tmp_path, gdb=True)
    assert argv[argv.index("-gdb") + 1] == "chardev:gdb0"
    stub = next(a for a in argv if a.startswith("socket,id=gdb0,"))
    assert f"path={tmp_path / 'gdb.sock'}" in stub and "host=" not in stub and "port=" not in stub
    assert not any(re.search(r"tcp:|:1234", a) for a in argv)
    assert "nokaslr" in argv[argv.index("-append") + 1]


def test_module_sections_from_the_guest_become_one_add_symbol_file() -> None:
    sections = debugger.parse_sections((DATA / "module-sections-x86_64.txt").read_text())
    assert ".text" in sections and ".text.unlikely" in sections and "__mcount_loc" in sections
    assert not any(n.startswith((".note", ".symtab", ".strtab")) for n in sections)
    cmd = debugger.ModuleSymbols("kbdebug", Path("/c/kbdebug.debug.ko"), "/src", sections).command()
    assert cmd.startswith(f"add-symbol-file /c/kbdebug.debug.ko {sections['.text']:#x} ")
    assert f"-s .text.unlikely {sections['.text.unlikely']:#x}" in cmd and "-s .text " not in cmd


@pytest.mark.parametrize("line", [".text 0xffffffffa0000000\nsource /etc/passwd", ".text\\n 0x1", "x;shell 0x10"])
def test_a_section_line_that_is_not_a_name_and_an_address_is_refused(line: str) -> None:
    """The guest's answer becomes gdb commands: nothing else gets through."""
    with pytest.raises(KbridgeError):
        debugger.parse_sections(line.replace("\\n", "\n") + "\n.data\t0xzz")


def test_gdb_without_a_vmlinux_is_told_the_architecture(tmp_path: Path) -> None:
    plan = debugger.Plan(ARM64, tmp_path / "gdb.sock", None, [])
    cmds = plan.commands()
    assert "set architecture aarch64" in cmds and cmds[-1] == f"target remote {tmp_path / 'gdb.sock'}"
    with_vmlinux = debugger.Plan(
        X86_64, tmp_path / "gdb.sock", tmp_path / "gdb/vmlinux", [], ("/kbridge-debug", tmp_path)
    )
    cmds = with_vmlinux.commands()
    assert f"add-auto-load-safe-path {tmp_path / 'gdb'}" in cmds and f"file {tmp_path / 'gdb/vmlinux'}" in cmds
    assert f"set substitute-path /kbridge-debug {tmp_path}" in cmds
    argv = with_vmlinux.argv(tmp_path / "k.gdb", [Path("mine.gdb")], ["info args"], batch=True)
    assert argv == [
        "gdb-multiarch",
        "-q",
        "-batch",
        "-x",
        str(tmp_path / "k.gdb"),
        "-x",
        "mine.gdb",
        "-ex",
        "info args",
    ]


# -- module builds ----------------------------------------------------------------------------


def test_the_module_cache_key_follows_the_kernel_build_not_only_its_release(tmp_path: Path) -> None:
    """Two builds of one release (the debug kernel with and without KASAN, or rebuilt from a new recipe)
    take different modules: a KASAN-built module does not load on a kernel without KASAN."""
    keys = []
    for i, symvers in enumerate((b"0x1\tkasan_report\tvmlinux\tEXPORT_SYMBOL\t\n", b"0x2\tprintk\tvmlinux\n")):
        d = tmp_path / str(i)
        headers = d / "headers/usr/src/linux-headers-6.1.192-kbridge-debug"
        headers.mkdir(parents=True)
        (headers / "Module.symvers").write_bytes(symvers)
        (headers / ".config").write_text("CONFIG_KASAN=y\n")
        img = Image(d, X86_64, "bookworm", "6.1.192-kbridge-debug", "6.1.192-3", "debug", "debug")
        keys.append(kbuild.cache_key({"Kbuild": b"obj-m := m.o\n"}, img))
    assert keys[0] != keys[1]


def test_a_users_module_is_built_with_its_paths_mapped_to_the_users_directory(tmp_path: Path) -> None:
    img = Image(tmp_path, X86_64, "bookworm", "6.1.0-56-amd64", "6.1.192-2")
    argv = kbuild.kbuild_argv(img, Path("/cache/kbuild/.build-1"), Path("/home/me/drv"))
    assert "KCFLAGS=-ffile-prefix-map=/cache/kbuild/.build-1=/home/me/drv" in argv
    spaced = kbuild.kbuild_argv(img, Path("/cache/kbuild/.build-1"), Path("/home/me/my drv"))
    assert not any(a.startswith("KCFLAGS=") for a in spaced)  # make would hand it to a shell split in two
