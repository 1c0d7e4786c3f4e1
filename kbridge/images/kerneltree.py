"""A kernel tree the user built (`--kernel-tree PATH`, the virtme-ng `vng -r` workflow), as a kbridge image.

    img = kerneltree.ensure(Path("~/linux"), arch)     # laid out once per build of the tree

PATH is where `make` ran (an O= directory or the source tree): kbridge takes its boot image
(`vmlinux` through PVH on x86_64 when it can, else `arch/x86/boot/bzImage` / `arch/arm64/boot/Image`),
`vmlinux` with its DWARF for gdb, `.config`, `Module.symvers` and the files external modules build
against, and boots it with its own initramfs (busybox and the guest agent from Debian bookworm) and
agent. Nothing is written to the tree and no make runs there. The same layout serves kbridge's own
debug kernel (kbridge.images.debugkernel).

An image directory (beside the Debian ones in the cache):

    kernel            what QEMU boots
    initramfs.cpio    the tree's virtio modules if they are =m, else none (an empty module list)
    headers/usr/src/linux-headers-KREL/
                      a kbuild tree for `make -C ... M=...`, laid out as Debian's headers packages
                      (scripts/package/builddeb), plus vmlinux (a link) and resolve_btfids, so modules
                      built against it get BTF when the kernel has DEBUG_INFO_BTF_MODULES
    gdb/vmlinux       with DWARF; gdb/vmlinux-gdb.py and gdb/scripts/gdb/linux/ (lx-symbols) when the
                      tree has them (CONFIG_GDB_SCRIPTS)
    config            the tree's .config;  build.json: where it came from, sizes, warnings
    manifest.json     written last
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kbridge import kernels, progress
from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.images.apt import Mirrors, PrivateApt, extract, mirrors_from_env
from kbridge.images.cache import files_intact, locked, sha256, staged
from kbridge.images.initramfs import build_initramfs
from kbridge.images.kconfig import parse_config
from kbridge.paths import cache_dir

FORMAT = 1  # bump when the layout changes: laid-out trees are laid out again
USERLAND = ("busybox-static", "qemu-guest-agent")  # the initramfs's programs, from Debian bookworm
# The files of the tree a layout depends on: when one changes, the tree was rebuilt.
STAMPED = ("vmlinux", ".config", "Module.symvers", "include/config/kernel.release")


@dataclass(frozen=True)
class Need:
    """A kernel option kbridge looks at, and what goes wrong without it."""

    option: str
    why: str
    required: bool = True  # False: one feature is missing (a warning), not the whole tool
    arch: str | None = None  # only for this arch
    module_ok: bool = False  # =m will do: the initramfs loads it


# What kbridge needs of a kernel it boots from a tree, checked on the tree's .config before the
# first boot. The initramfs loads only the virtio drivers the agent talks through, so everything
# else the init uses must be built in.
NEEDS: tuple[Need, ...] = (
    Need("CONFIG_MODULES", "kbridge's probes and your driver are modules"),
    Need("CONFIG_MODULE_UNLOAD", "kbridge removes its probe module after each run"),
    Need("CONFIG_KPROBES", "every probe registers a kprobe"),
    Need("CONFIG_KRETPROBES", "--ret and --entry register a kretprobe"),
    Need("CONFIG_KPROBE_EVENTS", "--via tracefs and kbridge trace write kprobe_events"),
    Need("CONFIG_FTRACE", "tracefs itself (kprobe_events, trace_pipe)"),
    Need("CONFIG_DEBUG_FS", "the probe modules' counters and kprobes/list are in debugfs"),
    Need("CONFIG_KALLSYMS", "symbols are resolved from /proc/kallsyms"),
    Need("CONFIG_VIRTIO_PCI", "the agent's virtio-serial device is on virtio-pci", module_ok=True),
    Need("CONFIG_VIRTIO_CONSOLE", "virtio-serial carries the guest agent and the kernel log", module_ok=True),
    Need("CONFIG_SERIAL_8250_CONSOLE", "console=ttyS0 shows boot messages and crash reports", arch="x86_64"),
    Need("CONFIG_SERIAL_AMBA_PL011_CONSOLE", "console=ttyAMA0 on QEMU's virt machine", arch="arm64"),
    Need("CONFIG_PCI_HOST_GENERIC", "the virt machine's PCIe host bridge, virtio-pci's bus", arch="arm64"),
    Need("CONFIG_BLK_DEV_INITRD", "kbridge boots an initramfs"),
    Need("CONFIG_BINFMT_SCRIPT", "the guest init is a #! script"),
    Need("CONFIG_BINFMT_ELF", "busybox and the guest agent are ELF programs"),
    Need("CONFIG_DEVTMPFS", "the init mounts devtmpfs"),
    Need("CONFIG_PROC_FS", "/proc/kallsyms and /proc/modules"),
    Need("CONFIG_SYSFS", "the init finds the agent's port in /sys/class/virtio-ports"),
    Need("CONFIG_FUTEX", "the guest agent is a threaded program"),
    Need("CONFIG_EVENTFD", "the guest agent's main loop"),
    Need("CONFIG_KALLSYMS_ALL", "probing static functions by name", required=False),
    Need("CONFIG_UNIX98_PTYS", "the init mounts devpts", required=False),
    Need("CONFIG_BPF_SYSCALL", "--via bpf", required=False),
    Need("CONFIG_BPF_EVENTS", "--via bpf attaches programs to kprobes", required=False),
    Need("CONFIG_DEBUG_INFO", "gdb reads the kernel's DWARF", required=False),
)
# Options kbridge cannot work with.
MUST_NOT: tuple[Need, ...] = (
    Need("CONFIG_MODULE_SIG_FORCE", "kbridge's modules are unsigned"),
    Need("CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY", "lockdown refuses unsigned modules"),
)


def check_config(config: dict[str, str], arch: Arch, what: str) -> list[str]:
    """Raise one error naming every option kbridge needs that CONFIG lacks (and every one it cannot
    work with); the optional ones missing, as warnings."""
    missing, warnings = [], []
    for need in NEEDS:
        value = config.get(need.option)
        if need.arch not in (None, arch.name) or value == "y" or (value == "m" and need.module_ok):
            continue
        state = "=m" if value == "m" else "not set"
        if need.required:
            missing.append(f"{need.option} ({state}: {need.why})")
        else:
            warnings.append(f"{need.option} is {state}: no {need.why}")
    refused = [f"{bad.option} (=y: {bad.why})" for bad in MUST_NOT if config.get(bad.option) == "y"]
    if missing or refused:
        parts = ([f"lacks {'; '.join(missing)}"] if missing else []) + (
            [f"has {'; '.join(refused)}"] if refused else []
        )
        fix = " ".join(f"-e {m.split(' ', 1)[0].removeprefix('CONFIG_')}" for m in missing) + " ".join(
            f" -d {r.split(' ', 1)[0].removeprefix('CONFIG_')}" for r in refused
        )
        raise KbridgeError(
            f"{what} {' and '.join(parts)}",
            f"scripts/config {fix.strip()} && make olddefconfig && make, then try again",
        )
    return warnings


def tree_arch(config: dict[str, str]) -> str | None:
    """The arch a .config was made for: x86_64 or arm64 (None: another one)."""
    if config.get("CONFIG_X86_64") == "y":
        return "x86_64"
    if config.get("CONFIG_ARM64") == "y":
        return "arm64"
    return None


def krel_of(tree: Path) -> str:
    """The tree's kernel release (uname -r), as kbuild wrote it."""
    try:
        return (tree / "include/config/kernel.release").read_text().strip()
    except OSError:
        raise KbridgeError(
            f"{tree} has no include/config/kernel.release: it is not a configured kernel build", "run make there"
        ) from None


def boot_file(tree: Path, arch: Arch, config: dict[str, str], pvh_safe: bool) -> tuple[Path, bool]:
    """What QEMU boots from TREE, and whether it is the ELF vmlinux (through its PVH entry, x86_64).

    PVH skips the bzImage's decompressor (seconds under TCG), but a KASAN kernel's PVH entry runs
    instrumented C before the KASAN shadow exists and triple-faults (6.1): such a tree boots its
    bzImage, unless it carries kbridge's fix (PVH_SAFE, the debug kernel's build).
    """
    if arch.direct_vmlinux and config.get("CONFIG_PVH") == "y" and (pvh_safe or config.get("CONFIG_KASAN") != "y"):
        return tree / "vmlinux", True
    name = "bzImage" if arch.kernel_arch in ("x86", "x86_64") else "Image"
    return tree / "arch" / arch.kernel_arch / "boot" / name, False


def cmdline(config: dict[str, str]) -> str:
    """Kernel arguments a kernel with CONFIG boots with: KASAN reports only a boot's first bug unless
    told otherwise (mm/kasan/report.c: report_enabled()), so a kept VM would miss every later one."""
    return "kasan_multi_shot" if config.get("CONFIG_KASAN") == "y" else ""


# -- the layout ------------------------------------------------------------------------------


def install(tree: Path, arch: Arch, work: Path, user_debs: list[Path], pvh_safe: bool = False) -> dict[str, object]:
    """Lay out a kbridge image in WORK from the built kernel TREE; its release, sizes, boot facts, warnings."""
    config = parse_config(_read(tree / ".config", tree))
    warnings = check_config(config, arch, f"kernel tree {tree}")
    krel = krel_of(tree)
    boot, elf = boot_file(tree, arch, config, pvh_safe)
    for need in (tree / "vmlinux", boot, tree / "Module.symvers", tree / "scripts/mod/modpost"):
        if not need.is_file():
            raise KbridgeError(
                f"kernel tree {tree} has no {need.relative_to(tree)}", "build it there first: make (vmlinux, modules)"
            )
    (work / "gdb").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tree / "vmlinux", work / "gdb/vmlinux")
    if elf:
        # QEMU loads only the PT_LOAD segments: without DWARF the file is ~4x smaller to read and hash.
        _run([f"{arch.cross_compile()}objcopy", "--strip-debug", str(tree / "vmlinux"), str(work / "kernel")])
    else:
        shutil.copyfile(boot, work / "kernel")
    if (tree / "vmlinux-gdb.py").is_file() and (tree / "scripts/gdb/linux").is_dir():
        _install_gdb_scripts(tree, work / "gdb")
    else:
        warnings.append("no vmlinux-gdb.py (CONFIG_GDB_SCRIPTS, make scripts_gdb): gdb works, its lx-* commands do not")
    install_headers(tree, work / "headers/usr/src" / f"linux-headers-{krel}", arch)
    modroot = work / "modroot"
    _modroot(tree, modroot)
    sysroot = work / "sysroot"
    for deb in user_debs:
        extract(deb, sysroot)
    build_initramfs(arch, krel, modroot, sysroot, work / "initramfs.cpio")
    shutil.rmtree(sysroot)
    shutil.rmtree(modroot)
    shutil.copyfile(tree / ".config", work / "config")
    return {
        "krel": krel,
        "cmdline": cmdline(config),
        "boots": "vmlinux (PVH)" if elf else boot.name,
        "warnings": warnings,
        "sizes": {
            "vmlinux": (work / "gdb/vmlinux").stat().st_size,
            "kernel": (work / "kernel").stat().st_size,
            "headers": _du(work / "headers"),
        },
    }


def _read(path: Path, tree: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        raise KbridgeError(
            f"{tree} has no {path.name}: it is not a configured kernel build", "run make there"
        ) from None


def _modroot(tree: Path, modroot: Path) -> None:
    """A modules directory for the initramfs builder: the tree's modules.builtin and its built .ko
    files (linked, not installed: no make runs in the tree). 6.1 lists .ko files in modules.order,
    6.2 on the .o files."""
    modroot.mkdir(parents=True)
    builtin = tree / "modules.builtin"
    (modroot / "modules.builtin").write_bytes(builtin.read_bytes() if builtin.is_file() else b"")
    order = tree / "modules.order"
    for line in order.read_text().split() if order.is_file() else []:
        ko = tree / re.sub(r"\.o$", ".ko", line)
        if ko.is_file():
            dest = modroot / "kernel" / ko.relative_to(tree)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(ko)


def install_headers(tree: Path, dest: Path, arch: Arch) -> None:
    """A self-contained kbuild tree for external modules, as Debian's builddeb lays one out.

    Source-side files come through the tree's `source` link for an O= build (else the tree
    itself), build-side ones from the tree. vmlinux (a link to gdb/vmlinux) and resolve_btfids
    are added: with both, DEBUG_INFO_BTF_MODULES gives external modules their .BTF section
    (Debian's headers have neither: "Skipping BTF generation ... due to unavailability of vmlinux").
    """
    src = (tree / "source").resolve() if (tree / "source").is_symlink() else tree
    srcarch = "x86" if arch.kernel_arch in ("x86", "x86_64") else arch.kernel_arch
    files = _walk(src, ".", maxdepth=1, names=r"Makefile.*")
    files += _walk(src, f"arch/{srcarch}", maxdepth=1, names=r"Makefile.*")
    files += _walk(src, "include") + _walk(src, "scripts")
    files += _walk(src, f"arch/{srcarch}", names=r"Kbuild\.platforms|Platform")
    for d in sorted((src / f"arch/{srcarch}").rglob("*")):
        if d.is_dir() and d.name in ("include", "scripts"):
            files += _walk(src, d.relative_to(src).as_posix())
    _copy(src, files, dest)
    built = _walk(tree, f"arch/{srcarch}/include") + _walk(tree, "include") + _walk(tree, "scripts")
    built += [
        f
        for f in ("Module.symvers", ".config", "tools/objtool/objtool", "tools/bpf/resolve_btfids/resolve_btfids")
        if (tree / f).is_file()
    ]
    _copy(tree, built, dest)
    (dest / "vmlinux").symlink_to(Path("../../../../gdb/vmlinux"))  # headers/usr/src/linux-headers-KREL


def _walk(root: Path, top: str, maxdepth: int | None = None, names: str | None = None) -> list[str]:
    """Files and links under ROOT/TOP (relative to ROOT), at most MAXDEPTH levels down, named NAMES."""
    base = root / top
    if not base.is_dir():
        return []
    out = []
    depth0 = len(base.parts)
    for cur, dirs, fnames in os.walk(base):
        here = Path(cur)
        for d in list(dirs):
            if (here / d).is_symlink():
                fnames.append(d)  # a link to a directory is copied as the link
        if maxdepth is not None and len(here.parts) - depth0 + 1 >= maxdepth:
            dirs[:] = []  # find -maxdepth: entries deeper than MAXDEPTH are not listed
        for f in fnames:
            if names is None or re.fullmatch(names, f):
                out.append((here / f).relative_to(root).as_posix())
    return out


def _copy(root: Path, files: list[str], dest: Path) -> None:
    """Copy FILES (relative to ROOT) into DEST, links kept as links."""
    for rel in sorted(set(files)):
        src, to = root / rel, dest / rel
        to.parent.mkdir(parents=True, exist_ok=True)
        if to.exists() or to.is_symlink():
            to.unlink()
        if src.is_symlink():
            to.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, to)


def _install_gdb_scripts(tree: Path, gdb_dir: Path) -> None:
    """vmlinux-gdb.py and scripts/gdb/linux/*.py, links resolved (in an O= tree they point into the source)."""
    shutil.copyfile(tree / "vmlinux-gdb.py", gdb_dir / "vmlinux-gdb.py")
    shutil.copytree(
        tree / "scripts/gdb/linux",
        gdb_dir / "scripts/gdb/linux",
        symlinks=False,
        ignore=shutil.ignore_patterns("*.o", ".*.cmd", "Makefile", "*.pyc", "__pycache__"),
    )


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KbridgeError(f"{' '.join(argv[:3])} ... failed: {(proc.stdout + proc.stderr).strip()[-1500:]}")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def userland_debs(arch: Arch, mirrors: Mirrors | None, dest: Path) -> list[Path]:
    """busybox and the guest agent (with its libraries) for ARCH, from Debian bookworm, into DEST."""
    suite = kernels.DEBUG_SUITE
    apt = PrivateApt(
        cache_dir() / "apt" / f"{suite}-{arch.debian}", suite, arch.debian, mirrors or mirrors_from_env(suite)
    )
    with progress.step(f"reading Debian {suite} package lists ({arch.debian})"):
        apt.update()
    with progress.step(f"downloading the guest userspace ({arch.debian})"):
        return apt.download_closure(list(USERLAND), dest)


def write_manifest(work: Path, arch: Arch, key: str, flavour: str, krel: str, version: str, cmd: str) -> None:
    """manifest.json, last: the image counts as complete from here on."""
    manifest = {
        "format": images.FORMAT,
        "tree_format": FORMAT,
        "guest": images.guest_digest(),
        "arch": arch.name,
        "suite": kernels.DEBUG_SUITE,
        "kernel": key,
        "flavour": flavour,
        "krel": krel,
        "version": version,
        "cmdline": cmd,
        "files": {rel: sha256(work / rel) for rel in ("kernel", "initramfs.cpio")},
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))


def load_dir(d: Path, arch: Arch, verify: bool = False) -> images.Image | None:
    """The image laid out in D (by this module or kbridge.images.debugkernel), or None when it is
    missing, partial, from another kbridge version or damaged."""
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        manifest.get("format") != images.FORMAT
        or manifest.get("tree_format") != FORMAT
        or manifest.get("guest") != images.guest_digest()
        or manifest.get("arch") != arch.name
    ):
        return None
    if not files_intact(d, manifest["files"], full=verify):
        return None
    img = images.Image(
        d,
        arch,
        manifest["suite"],
        manifest["krel"],
        manifest["version"],
        manifest["flavour"],
        kernel_id=manifest["kernel"],
        cmdline=manifest.get("cmdline", ""),
    )
    return img if (img.headers / "Makefile").is_file() else None


# -- --kernel-tree ---------------------------------------------------------------------------


def image_dir(tree: Path, arch: Arch) -> Path:
    return cache_dir() / "images" / f"{kernels.slug(kernels.TREE + str(tree))}-{arch.name}"


def stamp(tree: Path) -> str:
    """What says the tree was rebuilt: the size and mtime of the files a layout reads."""
    h = hashlib.sha256(f"{FORMAT}|{tree}".encode())
    for name in STAMPED:
        try:
            st = (tree / name).stat()
        except OSError:
            raise KbridgeError(
                f"kernel tree {tree} has no {name}: it is not a built kernel tree", "run make there first"
            ) from None
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "tree-" + h.hexdigest()[:16]


def ensure(tree: Path, arch: Arch, mirrors: Mirrors | None = None) -> images.Image:
    """The image of the kernel built in TREE for ARCH: laid out on first use and again when the tree
    was rebuilt (seconds: nothing is compiled); its configuration checked first."""
    tree = tree.resolve()
    config = parse_config(_read(tree / ".config", tree))
    made_for = tree_arch(config)
    if made_for != arch.name:
        raise KbridgeError(
            f"kernel tree {tree} is configured for {made_for or 'another architecture'}, not {arch.name}",
            f"--arch {made_for}" if made_for else "kbridge boots x86_64 and arm64 kernels",
        )
    version = stamp(tree)
    final = image_dir(tree, arch)
    if (img := load_dir(final, arch)) is not None and img.version == version:
        return img
    check_config(config, arch, f"kernel tree {tree}")  # before any download
    key = kernels.TREE + str(tree)
    with locked(final.parent / f".{final.name}.lock"):
        if (img := load_dir(final, arch)) is not None and img.version == version:
            return img
        with staged(final) as work:
            debs = userland_debs(arch, mirrors, work / "debs")
            with progress.step(f"laying out the kernel built in {tree} ({krel_of(tree)})"):
                info = install(tree, arch, work, debs)
            shutil.rmtree(work / "debs")
            (work / "build.json").write_text(json.dumps({"tree": str(tree), **info}, indent=1))
            write_manifest(work, arch, key, "tree", str(info["krel"]), version, str(info["cmdline"]))
    img = load_dir(final, arch, verify=True)
    if img is None:
        raise KbridgeError(f"the image laid out from {tree} did not verify", f"remove {final} and try again")
    for w in info["warnings"] if isinstance(info["warnings"], list) else []:
        progress.warn(f"kernel tree {tree}: {w}")
    return img
