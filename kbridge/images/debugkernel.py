"""The debug kernel (`--kernel debug`): Debian's own 6.1 source, built small, with the bug checkers on.

A driver developer's kernel: the same upstream version as bookworm's kernel, from Debian's
`linux-source-6.1` package, configured from `allnoconfig` plus `data/debug.config` (virtio
console/blk/net built in, kprobes, kretprobes, kprobe_events, BPF with BTF, modules with module
BTF, KASAN (generic, inline), KFENCE, lockdep (PROVE_LOCKING), DEBUG_ATOMIC_SLEEP, UBSAN, DWARF 5
and the gdb scripts, PVH). Debian ships no KASAN kernel, so kbridge builds one, once per arch,
into the cache (~1000 s of CPU: ~10 minutes on 2 idle cores), and lays it out as a kernel tree
(kbridge.images.kerneltree): a kbridge image plus vmlinux with DWARF for gdb.

The build runs only when the cache misses: a built image is used offline; `kbridge image build
--kernel debug --rebuild` builds it again (from the archive's current linux-source-6.1). With
`keep_tree` the source and build directories stay in the cache (~2.8 GB): a tree to hand to
`--kernel-tree`, and the sources gdb lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from kbridge import kernels, progress
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.images import kerneltree
from kbridge.images.apt import Mirrors, PrivateApt, extract, mirrors_from_env
from kbridge.images.cache import locked, staged
from kbridge.images.kconfig import parse_config
from kbridge.paths import cache_dir

SUITE = kernels.DEBUG_SUITE  # whose linux-source package, and whose userspace the initramfs gets
SOURCE_PACKAGE = "linux-source-6.1"
FLAVOUR = "debug"
FORMAT = 1  # bump when the recipe changes in a way the digest below does not see
DATA = Path(__file__).parent / "data"
FRAGMENT = DATA / "debug.config"
ARM64_FRAGMENT = DATA / "debug-arm64.config"
# Options of debug.config that are x86-only; arm64 leaves them out (QEMU's virt machine has a device tree).
X86_ONLY = ("CONFIG_PVH", "CONFIG_HYPERVISOR_GUEST", "CONFIG_PARAVIRT", "CONFIG_ACPI", "CONFIG_RANDOMIZE_BASE")
# Patches to Debian's source (patch -p1), per arch; each file says why.
PATCHES: dict[str, tuple[Path, ...]] = {"x86_64": (DATA / "pvh-kasan.patch",), "arm64": ()}
GCC = "gcc-12"  # bookworm's: the kernel and its modules (kbridge.kbuild) are built with the same compiler
DEBUG_PREFIX = "/kbridge-debug"  # DWARF paths: the build directory may be gone once the image is in place
# What `--kernel debug` promises: a build where one of these did not stick fails.
PROMISES = (
    "CONFIG_KASAN",
    "CONFIG_KASAN_GENERIC",
    "CONFIG_KFENCE",
    "CONFIG_PROVE_LOCKING",
    "CONFIG_DEBUG_ATOMIC_SLEEP",
    "CONFIG_UBSAN",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_DEBUG_INFO_BTF_MODULES",
    "CONFIG_GDB_SCRIPTS",
    "CONFIG_KPROBES",
    "CONFIG_KPROBE_EVENTS",
    "CONFIG_BPF_EVENTS",
)
# What the build runs, and the Debian package that has it.
HOST_TOOLS = {"make": "make", "bison": "bison", "flex": "flex", "bc": "bc", "pahole": "dwarves", "patch": "patch"}
HOST_HEADERS = {"/usr/include/libelf.h": "libelf-dev", "/usr/include/openssl/ssl.h": "libssl-dev"}


def fragment_for(arch: Arch) -> str:
    """The config fragment for ARCH: debug.config, minus the x86-only lines and plus debug-arm64.config on arm64."""
    text = FRAGMENT.read_text()
    if arch.name == "x86_64":
        return text
    kept = [ln for ln in text.splitlines() if not any(re.search(rf"\b{o}\b", ln) for o in X86_ONLY)]
    return "\n".join(kept) + "\n" + ARM64_FRAGMENT.read_text()


def unstuck(fragment: str, config: dict[str, str]) -> list[str]:
    """The fragment's settings the final .config does not have (Kconfig dropped them: a dependency is
    off). `# CONFIG_X is not set` counts as kept when X is absent: its dependencies hide it."""
    lost = []
    for raw in fragment.splitlines():
        line = raw.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            opt, want = m[1], m[2].strip('"')
            if config.get(opt) != want:
                lost.append(f"{opt}={want} (got {config.get(opt, 'unset')})")
        elif (m := re.fullmatch(r"# (CONFIG_\w+) is not set", line)) and config.get(m[1], "n") != "n":
            lost.append(f"{m[1]}=n (got {config[m[1]]})")
    return lost


def recipe(arch: Arch) -> str:
    """What the kernel depends on besides the source version: a change rebuilds it. (The compilers'
    versions are recorded in build.json, not here: a point update of gcc does not rebuild it.)"""
    h = hashlib.sha256(f"{FORMAT}|{arch.name}|{GCC}|{kerneltree.FORMAT}".encode())
    h.update(fragment_for(arch).encode())
    for patch in PATCHES[arch.name]:
        h.update(patch.read_bytes())
    return h.hexdigest()[:16]


# -- the cache -------------------------------------------------------------------------------


def image_dir(arch: Arch) -> Path:
    return cache_dir() / "images" / f"{FLAVOUR}-{SUITE}-{arch.name}"


def tree_dir(arch: Arch) -> Path:
    """Where the kernel is built (source in src/, objects in obj/): kept with keep_tree."""
    return cache_dir() / "trees" / f"{FLAVOUR}-{SUITE}-{arch.name}"


def load(arch: Arch | str | None = None, verify: bool = False) -> images.Image | None:
    """The built debug image of ARCH, or None when it is missing, partial, damaged or from another recipe."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    img = kerneltree.load_dir(image_dir(arch), arch, verify)
    if img is None or img.flavour != FLAVOUR:
        return None
    return img if build_info(img).get("recipe") == recipe(arch) else None


def build_info(img: images.Image) -> dict[str, object]:
    """build.json: the recipe, the source version, times, sizes, options Kconfig dropped."""
    try:
        return dict(json.loads((img.dir / "build.json").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def kept_tree(arch: Arch) -> Path | None:
    """The build directory of the debug kernel, when it was kept (keep_tree): a tree for --kernel-tree."""
    obj = tree_dir(arch) / "obj"
    return obj if (obj / "vmlinux").is_file() and (obj / "source").is_symlink() else None


def ensure(
    arch: Arch | str | None = None,
    mirrors: Mirrors | None = None,
    rebuild: bool = False,
    keep_tree: bool = False,
    jobs: int | None = None,
) -> images.Image:
    """The debug image of ARCH, built first when it is not in the cache (minutes: see the module doc)."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch)
    if not rebuild and (img := load(arch)) is not None and (not keep_tree or kept_tree(arch)):
        return img
    with locked(cache_dir() / "images" / f".{FLAVOUR}-{SUITE}-{arch.name}.lock"):
        if not rebuild and (img := load(arch, verify=True)) is not None and (not keep_tree or kept_tree(arch)):
            return img  # another process built it meanwhile
        return _build(arch, mirrors or mirrors_from_env(SUITE), keep_tree, jobs or os.cpu_count() or 1)


def check_host(arch: Arch) -> None:
    """The tools a kernel build needs, or one error naming the packages to install."""
    tools = {**HOST_TOOLS, GCC: "gcc-12", f"{arch.cross_compile()}{GCC}": arch.gcc_package("12")}
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    missing += [pkg for header, pkg in HOST_HEADERS.items() if not Path(header).is_file()]
    if missing:
        raise KbridgeError(
            f"building the debug kernel needs {', '.join(missing)}", f"sudo apt-get install {' '.join(missing)}"
        )


def _build(arch: Arch, mirrors: Mirrors, keep_tree: bool, jobs: int) -> images.Image:
    check_host(arch)
    t0 = time.monotonic()
    apt = PrivateApt(cache_dir() / "apt" / f"{SUITE}-{arch.debian}", SUITE, arch.debian, mirrors)
    with progress.step(f"reading Debian {SUITE} package lists ({arch.debian})"):
        apt.update()
    version = apt.version(SOURCE_PACKAGE)
    tree = tree_dir(arch)
    src, obj = tree / "src", tree / "obj"
    made = f"{recipe(arch)} {SOURCE_PACKAGE} {version}\n"
    # A kept tree of the same recipe and source is built on (make does only what changed); any other goes.
    reuse = (tree / "recipe").is_file() and (tree / "recipe").read_text() == made and (obj / ".config").is_file()
    if not reuse:
        shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True, exist_ok=True)
    try:
        with staged(image_dir(arch)) as work:
            with progress.step(f"downloading the guest userspace ({arch.debian})"):
                user_debs = apt.download_closure(list(kerneltree.USERLAND), work / "debs/user")
            if not reuse:
                with progress.step(f"downloading Debian {SUITE}'s {SOURCE_PACKAGE} ({version}, ~140 MB)"):
                    extract(apt.download([SOURCE_PACKAGE], work / "debs")[0], work / "pkg")
                with progress.step("unpacking the kernel source"):
                    tarball = next((work / "pkg/usr/src").glob(f"{SOURCE_PACKAGE}.tar.*"))
                    _run(["tar", "-C", str(tree), "-xf", str(tarball)])  # its top directory is SOURCE_PACKAGE/
                    (tree / SOURCE_PACKAGE).rename(src)
                    shutil.rmtree(work / "pkg")
                    for patch in PATCHES[arch.name]:
                        _run(["patch", "-p1", "-d", str(src), "-i", str(patch)])
                with progress.step(f"configuring ({arch.name}: allnoconfig + {FRAGMENT.name})"):
                    configure(src, obj, arch)
                (tree / "recipe").write_text(made)
            lost = unstuck(fragment_for(arch), parse_config((obj / ".config").read_text()))
            config = parse_config((obj / ".config").read_text())
            if broken := [o for o in PROMISES if config.get(o) != "y"]:
                raise KbridgeError(
                    f"the debug kernel's configuration lost {', '.join(broken)}", f"Kconfig dropped: {lost}"
                )
            with progress.step(
                f"building the debug kernel ({arch.name}, {jobs} jobs: ~1000 s of CPU, ~10 min on 2 idle cores)"
            ):
                times = make_kernel(obj, arch, jobs, tree)
            with progress.step("laying out the image (kernel, headers, initramfs, gdb files)"):
                info = kerneltree.install(obj, arch, work, user_debs, pvh_safe=True)
            shutil.rmtree(work / "debs")
            build = {
                "recipe": recipe(arch),
                "source": f"{SOURCE_PACKAGE} {version}",
                "unstuck": lost,
                "tree": str(obj) if keep_tree else None,
                "compilers": [
                    _first_line([f"{arch.cross_compile()}{GCC}", "--version"]),
                    _first_line(["pahole", "--version"]),
                ],
                **times,
                **info,
                "total_wall_s": round(time.monotonic() - t0, 1),
            }
            (work / "build.json").write_text(json.dumps(build, indent=1))
            kerneltree.write_manifest(
                work, arch, kernels.DEBUG, FLAVOUR, str(info["krel"]), version, str(info["cmdline"])
            )
    except BaseException:
        for log in obj.glob("*.log"):  # what make said stays, beside the tree (which goes)
            with contextlib.suppress(OSError):
                shutil.copyfile(log, tree.parent / f"{tree.name}-{log.name}")
        raise
    finally:
        if not keep_tree:
            shutil.rmtree(tree, ignore_errors=True)
    img = load(arch, verify=True)
    if img is None:
        raise KbridgeError(
            "the debug image that was just built did not verify", f"remove {image_dir(arch)} and build again"
        )
    progress.info(f"debug kernel ready: {img.krel} ({arch.name}), built in {build['total_wall_s']:.0f} s")
    return img


def make_vars(arch: Arch) -> list[str]:
    """ARCH=, CROSS_COMPILE= and the compilers, as kbridge.kbuild passes them for modules. (A cross
    build names its compiler on the command line: Debian has aarch64-linux-gnu-gcc-12 but no
    unversioned aarch64-linux-gnu-gcc, and Kconfig probes the compiler.)"""
    cross = arch.cross_compile()
    return [f"ARCH={arch.kernel_arch}", f"CROSS_COMPILE={cross}", f"CC={cross}{GCC}", f"HOSTCC={GCC}"]


def boot_target(arch: Arch) -> str:
    return "bzImage" if arch.kernel_arch in ("x86", "x86_64") else "Image"


def configure(src: Path, obj: Path, arch: Arch) -> list[str]:
    """allnoconfig with the fragment as KCONFIG_ALLCONFIG (what merge_config.sh -n does, without its
    environment-only CC, which a cross build needs on the command line); the settings that did not stick."""
    obj.mkdir(parents=True, exist_ok=True)
    fragment = fragment_for(arch)
    (obj / "kbridge-debug.config").write_text(fragment)
    _make(
        src, arch, 1, obj / "config.log", f"O={obj}", f"KCONFIG_ALLCONFIG={obj / 'kbridge-debug.config'}", "allnoconfig"
    )
    return unstuck(fragment, parse_config((obj / ".config").read_text()))


def make_kernel(obj: Path, arch: Arch, jobs: int, tree: Path) -> dict[str, float]:
    """vmlinux, the boot image and modules, then what external modules and gdb need; timed."""
    # DWARF paths name the build directory, which is deleted unless kept: map them to a fixed prefix
    # (kbridge gdb maps it back when the tree is kept).
    kcflags = f"KCFLAGS=-fdebug-prefix-map={tree}={DEBUG_PREFIX}"
    t0, c0 = time.monotonic(), _children_cpu()
    _make(obj, arch, jobs, obj / "build.log", kcflags, "vmlinux", boot_target(arch), "modules")
    wall, cpu = time.monotonic() - t0, _children_cpu() - c0
    _make(obj, arch, jobs, obj / "prepare.log", kcflags, "modules_prepare", "scripts_gdb")
    return {"build_wall_s": round(wall, 1), "build_cpu_s": round(cpu, 1), "jobs": jobs}


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _make(cwd: Path, arch: Arch, jobs: int, log: Path, *args: str) -> None:
    """make ARGS in CWD, niced (the host stays usable), its output in LOG; killed with kbridge."""
    argv = ["nice", "-n", "15", "make", f"-j{jobs}", *make_vars(arch), *args]
    if shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the build goes with kbridge
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-40:]
        saved = log.parent.parent.parent / f"{log.parent.parent.name}-{log.name}"
        raise KbridgeError(f"make {' '.join(args)} failed (the whole log: {saved}):\n" + "\n".join(tail))


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KbridgeError(f"{' '.join(argv[:4])} ... failed:\n{(proc.stdout + proc.stderr).strip()[-2000:]}")


def _first_line(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return ""
