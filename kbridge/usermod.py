"""A user's own out-of-tree kernel module: build it for a guest kernel, load it, unload it.

    built = build_module(Path("mydriver"), target.image)     # kbuild, cached
    mod = load_module(target, built, {"debug": 1})            # push, insmod, the load's log
    unload_module(target, mod.name)                           # rmmod, nothing left

The source directory is copied into the cache and built there (the user's tree
is never written to), keyed by its content + kernel release + arch, so an
unchanged module is not rebuilt. Compiler messages point at the user's own
files. Parameters are checked against the module's declared `module_param`s
and their types before anything reaches the guest, and go to insmod as argv
entries; a failed init leaves nothing loaded.

Files in and out of the guest (`push`, `pull`) and the symbols of loaded modules
(`resolve_module_symbol`, for `MOD:SYM` names) live here too.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kbridge import buildroot, elf, progress
from kbridge.build import HOST_GCC, check_vermagic, kbuild_argv, uses_build_root
from kbridge.errors import KbridgeError
from kbridge.images.image import Image
from kbridge.paths import cache_dir
from kbridge.symbols import _TEXT_TYPES, Resolution, SymbolError, SymbolTable
from kbridge.targets.base import OOPS_MARKERS, GuestCrash, KmsgRecord, Target

FORMAT = 1  # bump when the cache layout changes
MAX_SOURCE_FILES = 2000
MAX_SOURCE_BYTES = 64 << 20
MAX_PUSH_BYTES = 256 << 20  # the guest agent moves ~3 MiB/s: larger files belong in an image
MODULE_NAME_LEN = 56  # include/linux/module.h: MODULE_NAME_LEN (64 - sizeof(unsigned long))
GUEST_PREFIX = "/tmp/kbridge-usermod-"  # the module and loader files while a load runs
CHARP_MAX = 1024  # kernel/params.c: param_set_charp refuses longer strings (-ENOSPC)

# Build products, VCS state, tests and docs: kbuild reads none of them, so they are
# neither copied nor part of the cache key.
_SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".tmp_versions"})
_SKIP_SUFFIXES = (
    ".o",
    ".ko",
    ".mod",
    ".mod.c",
    ".mod.o",
    ".cmd",
    ".a",
    ".order",
    ".symvers",
    ".d",
    ".tmp",
    ".py",
    ".pyc",
    ".md",
    ".rst",
)
_SKIP_NAMES = frozenset({"Module.symvers", "modules.order", "Module.markers"})
_OBJ_M = re.compile(r"^\s*obj-m\s*[:+]?=", re.MULTILINE)
_OBJ_CONFIG = re.compile(r"^\s*obj-\$\((CONFIG_\w+)\)", re.MULTILINE)
_DIAG = re.compile(
    r"^(?P<file>[^:\s][^:]*):(?P<line>\d+):(?:(?P<col>\d+):)? "
    r"(?P<kind>(?:fatal )?error|warning|note): (?P<msg>.*)$"
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODNAME = re.compile(r"[A-Za-z0-9_-]+")
# What a charp/string parameter may hold: the kernel splits insmod's arguments on
# spaces and honours double quotes (kernel/params.c next_arg), so a value with a space
# or a quote could smuggle in another parameter.
_STRING_VALUE = re.compile(r"[\x21-\x7e]*")
_STRING_FORBIDDEN = frozenset("\"'\\`")

# (min, max) of each integer parameter type (kernel/params.c STANDARD_PARAM_DEF).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "byte": (0, 0xFF),
    "short": (-(1 << 15), (1 << 15) - 1),
    "ushort": (0, 0xFFFF),
    "int": (-(1 << 31), (1 << 31) - 1),
    "uint": (0, 0xFFFFFFFF),
    "hexint": (0, 0xFFFFFFFF),
    "long": (-(1 << 63), (1 << 63) - 1),
    "ulong": (0, (1 << 64) - 1),
    "ullong": (0, (1 << 64) - 1),
}
_BOOL_WORDS = {
    "1": "1",
    "0": "0",
    "y": "Y",
    "n": "N",
    "yes": "Y",
    "no": "N",
    "true": "Y",
    "false": "N",
    "on": "Y",
    "off": "N",
}

# insmod errors raised by the kernel's loader before the module's init runs
# (kernel/module/main.c, 6.1); any other errno is what the init function returned.
_LOADER_ERRORS: dict[int, str] = {
    errnos.ENOEXEC: "the kernel refused the file as a module for it (vermagic, format or arch)",
    errnos.ENOENT: "the module uses a symbol this kernel does not export (the log names it)",
    errnos.EEXIST: "a module of that name is already loaded",
    errnos.EKEYREJECTED: "the module's signature was rejected",
    errnos.EPERM: "loading modules is not permitted (modules_disabled or lockdown)",
}


# The guest's loader. busybox insmod retries with init_module(2) whenever finit_module(2)
# fails, so a module whose init fails would run its init twice (measured: busybox 1.35
# on 6.1). This calls finit_module once and exits with its errno; no libc, so the
# module cross compiler builds it for either arch.
LOADER_C = r"""
/* kbridge-insmod FILE [PARAMS]: finit_module(2), once; exit status = errno (0: loaded). */
#if defined(__x86_64__)
#define NR_OPENAT 257
#define NR_FINIT_MODULE 313
#define NR_EXIT_GROUP 231
__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall cmain\n\thlt\n");
static long sys3(long n, long a, long b, long c)
{
	long r;

	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return r;
}
#elif defined(__aarch64__)
#define NR_OPENAT 56
#define NR_FINIT_MODULE 273
#define NR_EXIT_GROUP 94
__asm__(".globl _start\n_start:\n\tmov x0, sp\n\tbl cmain\n");
static long sys3(long n, long a, long b, long c)
{
	register long x8 __asm__("x8") = n;
	register long x0 __asm__("x0") = a;
	register long x1 __asm__("x1") = b;
	register long x2 __asm__("x2") = c;

	__asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
	return x0;
}
#endif

void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	long fd, ret = 22;

	if (argc == 2 || argc == 3) {
		fd = sys3(NR_OPENAT, -100, (long)argv[1], 02000000);
		ret = fd < 0 ? 250 : -sys3(NR_FINIT_MODULE, fd, (long)(argc == 3 ? argv[2] : ""), 0);
	}
	sys3(NR_EXIT_GROUP, ret, 0, 0);
	for (;;)
		;
}
"""


class LoadError(KbridgeError):
    """insmod failed; `errno` names the error (e.g. "ENODEV"), `log` holds the load's kernel log."""

    def __init__(self, message: str, hint: str | None, errno: str, log: list[str]) -> None:
        super().__init__(message, hint)
        self.errno = errno
        self.log = log


@dataclass(frozen=True)
class BuiltModule:
    """One .ko built from a user's source directory for one kernel."""

    name: str  # as the kernel names it (lsmod, /proc/modules, MOD:SYM)
    ko: Path  # in kbridge's cache
    src: Path
    krel: str
    arch: str
    params: dict[str, str] = field(default_factory=dict)  # module_param name -> type ("int", "charp", "array of int")
    warnings: tuple[str, ...] = ()  # compiler warnings, pointing at the user's files


@dataclass(frozen=True)
class LoadedModule:
    """A module insmod loaded; `log` is what the kernel logged while it loaded."""

    name: str
    ko: Path
    params: dict[str, str]
    log: list[str]


# -- build --------------------------------------------------------------------------


def source_files(src: Path) -> dict[str, bytes]:
    """The files of the module directory SRC (relative path -> bytes), build products left out."""
    if not src.is_dir():
        raise KbridgeError(
            f"module source {str(src)!r} is not a directory",
            "give the directory holding your Kbuild or Makefile (obj-m := mydrv.o)",
        )
    if not (src / "Kbuild").is_file() and not (src / "Makefile").is_file():
        raise KbridgeError(
            f"{str(src)!r} has no Kbuild or Makefile", "add a Kbuild file with one line: obj-m := mydrv.o"
        )
    files: dict[str, bytes] = {}
    total = 0
    for root, dirs, names in os.walk(src, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES) or name.startswith("."):
                continue
            path = Path(root) / name
            if not path.is_file():  # a dangling link, a socket: not source
                continue
            rel = path.relative_to(src).as_posix()
            data = path.read_bytes()
            total += len(data)
            files[rel] = data
            if len(files) > MAX_SOURCE_FILES or total > MAX_SOURCE_BYTES:
                raise KbridgeError(
                    f"module source {str(src)!r} is too large (over {MAX_SOURCE_FILES} files "
                    f"or {MAX_SOURCE_BYTES >> 20} MiB)",
                    "point at the module's own directory, not a whole tree",
                )
    text = (files.get("Kbuild") or files.get("Makefile") or b"").decode(errors="replace")
    if not _OBJ_M.search(text):
        which = "Kbuild" if "Kbuild" in files else "Makefile"
        if m := _OBJ_CONFIG.search(text):
            raise KbridgeError(
                f"{src / which} builds with obj-$({m[1]}), which is not set for an out-of-tree build",
                f"use obj-m := ... in {which}",
            )
        raise KbridgeError(
            f"{src / which} has no obj-m line: kbuild would build no module", f"add to {which}: obj-m := mydrv.o"
        )
    return files


def cache_key(files: Mapping[str, bytes], image: Image) -> str:
    """Content of the source + kernel release + arch (+ the headers' package version)."""
    h = hashlib.sha256(f"{FORMAT}|{image.krel}|{image.arch.name}|{image.version}".encode())
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()[:24]


def build_modules(src: Path, image: Image) -> list[BuiltModule]:
    """Every module (obj-m) of the directory SRC, built for IMAGE's kernel, from the cache when unchanged."""
    src = Path(src)
    files = source_files(src)
    out = cache_dir() / "usermods" / cache_key(files, image)
    if (cached := _from_cache(out, src, image)) is not None:
        return cached
    cc = f"{image.arch.cross_compile()}gcc-{HOST_GCC}"
    if (missing := [t for t in ("make", cc) if shutil.which(t) is None]) and not uses_build_root(image):
        pkg = "gcc-12" if not image.arch.cross_compile() else f"gcc-12-{image.arch.gnu_triplet}"
        raise KbridgeError(
            f"cannot build modules: {', '.join(missing)} not found",
            f"sudo apt-get install make {pkg} (kbridge doctor checks the rest)",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        for rel, data in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        with progress.step(f"building {src} for {image.krel} ({image.arch.name})"):
            proc = subprocess.run(
                kbuild_argv(image, work), check=False, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
            )
        output = map_paths(proc.stdout + proc.stderr, work, src)
        if proc.returncode != 0:
            raise KbridgeError(explain_build_failure(output, src), "fix the code above and build again")
        kos = sorted(work.rglob("*.ko"))
        if not kos:
            raise KbridgeError(f"building {src} produced no .ko file", "check the obj-m line names your objects")
        mods = []
        for ko in kos:
            data = ko.read_bytes()
            check_vermagic(data, image.krel)
            info = elf.modinfo(data, str(ko.name))
            # Debug info is most of a module's size; the guest needs none of it.
            subprocess.run([f"{image.arch.cross_compile()}objcopy", "--strip-debug", str(ko)], check=False)
            mods.append(
                {
                    "name": info.get("name") or ko.stem.replace("-", "_"),
                    "ko": ko.relative_to(work).as_posix(),
                    "params": module_params(data),
                }
            )
        warnings = [d for d in diagnostics(output, src) if " warning: " in d]
        (work / "kbridge-build.json").write_text(json.dumps({"modules": mods, "warnings": warnings}))
        if out.exists() and _from_cache(out, src, image) is None:
            shutil.rmtree(out, ignore_errors=True)  # a damaged earlier build under the same key
        try:
            work.rename(out)
        except OSError:  # another kbridge built the same source meanwhile: use that one
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result = _from_cache(out, src, image)
    assert result is not None
    return result


def build_loader(image: Image) -> Path:
    """The guest's finit_module loader (LOADER_C) for IMAGE's arch, built once and cached.

    It uses no library, so the host's compiler builds it for every kernel.
    """
    cc = f"{image.arch.cross_compile()}gcc-{HOST_GCC}"
    digest = hashlib.sha256(f"{LOADER_C}|{cc}".encode()).hexdigest()[:16]
    out = cache_dir() / "usermods" / "loader" / f"kbridge-insmod-{image.arch.name}-{digest}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "loader.c"
        src.write_text(LOADER_C)
        argv = [
            cc,
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-o",
            str(Path(tmp) / "loader"),
            str(src),
        ]
        try:
            proc = subprocess.run(argv, check=False, capture_output=True, text=True)
        except FileNotFoundError:
            raise KbridgeError(f"{cc} not found", "kbridge doctor --fix installs the compilers") from None
        if proc.returncode != 0:
            raise KbridgeError(f"building the guest loader failed: {proc.stderr.strip()[-800:]}")
        (Path(tmp) / "loader").rename(out)
    return out


def build_module(src_dir: Path, image: Image, name: str | None = None) -> BuiltModule:
    """The module built from SRC_DIR for IMAGE's kernel; NAME picks one when obj-m lists several."""
    mods = build_modules(src_dir, image)
    if name is None and len(mods) == 1:
        return mods[0]
    for m in mods:
        if m.name == name:
            return m
    names = ", ".join(m.name for m in mods)
    if name is None:
        raise KbridgeError(f"{str(src_dir)!r} builds several modules ({names})", "name the one you want")
    raise KbridgeError(f"{str(src_dir)!r} builds no module named {name!r} (it builds: {names})")


def _from_cache(out: Path, src: Path, image: Image) -> list[BuiltModule] | None:
    try:
        meta = json.loads((out / "kbridge-build.json").read_text())
        mods = [
            BuiltModule(
                m["name"],
                out / m["ko"],
                src,
                image.krel,
                image.arch.name,
                dict(m["params"]),
                tuple(meta.get("warnings", ())),
            )
            for m in meta["modules"]
        ]
        for m in mods:
            check_vermagic(m.ko.read_bytes(), image.krel)
        return mods
    except (OSError, ValueError, KeyError, KbridgeError):
        return None


def map_paths(output: str, work: Path, src: Path) -> str:
    """kbuild's output with the build copy's paths replaced by the user's own."""
    shown = str(src).rstrip("/") or "."
    # gcc quotes with U+2018/U+2019 when it thinks the terminal takes UTF-8: plain ASCII reads alike.
    output = output.replace("\u2018", "'").replace("\u2019", "'")
    # Inside a suite's build root (kbridge.buildroot) the copy is mounted at MODULE_AT.
    for where in (str(work), buildroot.MODULE_AT):
        output = output.replace(where + "/", shown + "/").replace(where, shown)
    return output


def diagnostics(output: str, src: Path) -> list[str]:
    """Compiler errors and warnings as FILE:LINE: KIND: MESSAGE, each with the user's source line."""
    shown: list[str] = []
    for raw in output.splitlines():
        m = _DIAG.match(raw.strip())
        if not m or m["kind"] == "note":
            continue
        line = int(m["line"])
        text = f"{m['file']}:{line}: {m['kind']}: {m['msg']}"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            lines = Path(m["file"]).read_text().splitlines()
            if 0 < line <= len(lines):
                text += f"\n    {line} | {lines[line - 1].strip()}"
        shown.append(text)
    return shown


def explain_build_failure(output: str, src: Path) -> str:
    """The errors (then warnings) of a failed build, or the end of kbuild's output when none parse."""
    diags = diagnostics(output, src)
    errors = [d for d in diags if " warning: " not in d]
    if errors:
        body = "\n".join(errors[:20]) + (f"\n... and {len(errors) - 20} more" if len(errors) > 20 else "")
    else:
        # modpost and make errors ("ERROR: modpost: \"foo\" undefined!") have no line numbers.
        body = "\n".join(line for line in output.strip().splitlines()[-25:])
    return f"building the module in {str(src)!r} failed:\n{body}"


def module_params(ko: bytes) -> dict[str, str]:
    """module_param name -> type, from the module's .modinfo (parmtype=NAME:TYPE)."""
    params: dict[str, str] = {}
    body = elf.sections(ko, "module").get(".modinfo")
    for item in (body[1] if body else b"").split(b"\0"):
        if item.startswith(b"parmtype="):
            pname, _, ptype = item[len(b"parmtype=") :].decode(errors="replace").partition(":")
            params[pname] = ptype
    return params


# -- parameters -------------------------------------------------------------------


def parse_param(text: str) -> tuple[str, str]:
    """A --param KEY=VALUE from the command line."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise KbridgeError(f"invalid --param {text!r}: expected NAME=VALUE", "e.g. --param debug=1")
    return key, value


def validate_params(
    params: Mapping[str, str | int | bool | list | tuple] | None, declared: Mapping[str, str], module: str
) -> list[str]:
    """insmod's NAME=VALUE arguments, each checked against the module's declared parameters."""
    argv = []
    for name, value in (params or {}).items():
        if not isinstance(name, str) or not _IDENT.fullmatch(name):
            raise KbridgeError(f"invalid parameter name {name!r}: a module parameter is a C identifier")
        if name not in declared:
            known = ", ".join(f"{k} ({v})" for k, v in sorted(declared.items())) or "none"
            raise KbridgeError(f"module {module} has no parameter {name!r}", f"its parameters (module_param): {known}")
        argv.append(f"{name}={format_value(name, value, declared[name])}")
    return argv


def format_value(name: str, value: object, ptype: str) -> str:
    """VALUE as the kernel's parser for PTYPE accepts it; a KbridgeError quoting it otherwise."""
    if ptype.startswith("array of "):
        items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
        return ",".join(format_value(name, v, ptype[len("array of ") :]) for v in items)
    bad = f"invalid value {value!r} for parameter {name} ({ptype})"
    if ptype in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise KbridgeError(bad, "give an integer")
        if isinstance(value, str):
            if not re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|\d+)", value):
                raise KbridgeError(bad, "give an integer (decimal or 0x...)")
            value = int(value, 0) if not re.fullmatch(r"-?0\d+", value) else int(value, 8)
        lo, hi = _INT_RANGES[ptype]
        if not lo <= value <= hi:
            raise KbridgeError(bad, f"{ptype} holds {lo}..{hi}")
        return hex(value) if ptype == "hexint" else str(value)
    if ptype in ("bool", "invbool"):
        if isinstance(value, bool):
            return "Y" if value else "N"
        word = _BOOL_WORDS.get(str(value).lower())
        if word is None:
            raise KbridgeError(bad, "give 1/0, y/n or true/false")
        return word
    if ptype in ("charp", "string"):
        text = str(value)
        if not _STRING_VALUE.fullmatch(text) or _STRING_FORBIDDEN & set(text):
            raise KbridgeError(
                bad,
                "string parameters take printable characters without spaces, "
                "quotes or backslashes (insmod would split them)",
            )
        if len(text) > CHARP_MAX:
            raise KbridgeError(
                f"value for parameter {name} is {len(text)} characters long", f"the kernel takes at most {CHARP_MAX}"
            )
        return text
    raise KbridgeError(
        f"parameter {name} has a type kbridge cannot check ({ptype!r})",
        "use a standard module_param type (int, uint, long, bool, charp, ...)",
    )


# -- load / unload ------------------------------------------------------------------


def loaded_modules(target: Target) -> dict[str, str]:
    """Loaded module name -> its /proc/modules taint flags ("OE" for an unsigned out-of-tree one)."""
    text = target.read_file("/proc/modules").decode(errors="replace")
    mods = {}
    for line in text.splitlines():
        parts = line.split()
        if parts:
            flags = line.rsplit("(", 1)[1].rstrip(")") if line.rstrip().endswith(")") else ""
            mods[parts[0]] = flags
    return mods


def load_module(
    target: Target,
    src_or_built: Path | str | BuiltModule,
    params: Mapping[str, str | int | bool | list | tuple] | None = None,
    timeout: float = 60.0,
) -> LoadedModule:
    """Build (if given a directory), push and insmod a user's module in TARGET; its load log.

    A failed init raises LoadError (the errno and the log), an oops in init GuestCrash
    (the guest is marked for restart); either way nothing of the module stays loaded
    in a guest that is reused.
    """
    built = src_or_built if isinstance(src_or_built, BuiltModule) else build_module(Path(src_or_built), target.image)
    if (built.krel, built.arch) != (target.krel, target.arch.name):
        raise KbridgeError(
            f"{built.ko.name} was built for {built.krel} ({built.arch}), "
            f"the guest runs {target.krel} ({target.arch.name})",
            "build it for this guest: load the source directory instead",
        )
    args = validate_params(params, built.params, built.name)  # before anything reaches the guest
    if built.name in loaded_modules(target):
        raise KbridgeError(
            f"module {built.name} is already loaded in the {target.arch.name} guest",
            f"kbridge module unload {built.name}",
        )
    loader = build_loader(target.image)
    # Both are removed once loaded: the kernel keeps its own copy of the module.
    guest_ko = f"{GUEST_PREFIX}{built.name}.ko"
    guest_loader = f"{GUEST_PREFIX}insmod-{secrets.token_hex(4)}"
    try:
        target.write_file(guest_ko, built.ko.read_bytes())
        target.write_file(guest_loader, loader.read_bytes())
        target.run(["/bin/busybox", "chmod", "0700", guest_loader], timeout=30)
        with _logged(target, f"insmod {built.name}") as log:
            # Values were validated: no spaces or quotes, so the kernel splits these exactly.
            res = target.run([guest_loader, guest_ko, " ".join(args)], timeout=timeout)
    finally:
        with contextlib.suppress(KbridgeError):
            target.run(["/bin/busybox", "rm", "-f", guest_ko, guest_loader], timeout=10)
    lines = [r.text for r in log]
    if _crash_lines(lines) or res.signal is not None:
        target.mark_crashed()
        text = "\n".join(lines) or target.console_tail()
        how = f"the loader was killed by signal {res.signal}" if res.signal else "the kernel log shows an oops"
        raise GuestCrash(
            f"loading {built.name} crashed the guest kernel in its init ({how}); "
            "the module cannot be removed from this guest",
            text,
        )
    if _oops_lines(lines):  # a WARN in init: the module loaded, the log shows the warning
        progress.warn(f"{built.name}'s init triggered a kernel warning (WARN_ON): see its log")
    if not res.ok:
        err = res.exitcode if 0 < res.exitcode < 250 else None
        why = "the loader could not open the module file" if res.exitcode == 250 else res.text
        left = built.name in loaded_modules(target)
        raise _load_error(built.name, err, why, lines, left)
    return LoadedModule(built.name, built.ko, dict(a.split("=", 1) for a in args), lines)


def unload_module(target: Target, name: str, missing_ok: bool = False, timeout: float = 60.0) -> list[str]:
    """rmmod NAME (a module loaded by load_module); the kernel log of its exit."""
    if not _MODNAME.fullmatch(name or "") or len(name) >= MODULE_NAME_LEN:
        raise KbridgeError(
            f"invalid module name {name!r}", "a module name is like mydrv (kbridge vm exec -- lsmod lists them)"
        )
    name = name.replace("-", "_")  # the kernel's own spelling of a module name
    mods = loaded_modules(target)
    if name not in mods:
        if missing_ok:
            return []
        ours = sorted(n for n, f in mods.items() if "O" in f)
        raise KbridgeError(
            f"module {name!r} is not loaded in the {target.arch.name} guest",
            f"loaded out-of-tree modules: {', '.join(ours)}" if ours else "no out-of-tree module is loaded",
        )
    if "O" not in mods[name]:
        # The guest's own drivers (virtio_console carries the agent kbridge talks through).
        raise KbridgeError(
            f"module {name!r} is part of the guest kernel, not one you loaded",
            "kbridge module unload removes out-of-tree modules only",
        )
    with _logged(target, f"rmmod {name}") as log:
        res = target.run(["/sbin/rmmod", name], timeout=timeout)
    lines = [r.text for r in log]
    if _crash_lines(lines):
        target.mark_crashed()
        raise GuestCrash(f"unloading {name} crashed the guest kernel: its exit function oopsed", "\n".join(lines))
    if not res.ok:
        why = res.stderr.decode(errors="replace").strip()
        holders = _holders(target, name)
        hint = (
            f"it is in use by {', '.join(holders)}: unload those first"
            if holders
            else "close what holds it open (a process with its device open), then unload it"
        )
        raise KbridgeError(f"rmmod {name} failed: {why}", hint)
    if name in loaded_modules(target):
        raise KbridgeError(f"module {name} is still loaded after rmmod")
    return lines


def unload_since(target: Target, before: set[str]) -> list[str]:
    """Unload the out-of-tree modules loaded since BEFORE was taken (test cleanup); their names.

    Dependants go first: a module another one uses cannot be removed before it.
    """
    left = {n for n, flags in loaded_modules(target).items() if n not in before and "O" in flags}
    done: list[str] = []
    while left:
        progress_made = False
        for name in sorted(left):
            with contextlib.suppress(KbridgeError):
                unload_module(target, name)
                done.append(name)
                progress_made = True
        left -= set(done)
        if not progress_made:
            raise KbridgeError(
                f"could not unload {', '.join(sorted(left))} after the test",
                "something holds them (an open device, another module)",
            )
    return done


def _holders(target: Target, name: str) -> list[str]:
    with contextlib.suppress(KbridgeError):
        out = target.run(["/bin/busybox", "ls", f"/sys/module/{name}/holders"], timeout=10)
        return out.text.split()
    return []


@contextlib.contextmanager
def _logged(target: Target, what: str) -> Iterator[list[KmsgRecord]]:
    """The kernel log records written while the body runs, between two markers kbridge writes.

    The log stream replays the backlog when it is opened, so the records of this
    step are those after our own start marker and before our end marker.
    """
    token = secrets.token_hex(4)
    start, end = f"kbridge: {what} {token} start", f"kbridge: {what} {token} end"
    stream = target.kmsg()
    records: list[KmsgRecord] = []
    target.write_file("/dev/kmsg", (start + "\n").encode())
    try:
        yield records
    finally:
        with contextlib.suppress(KbridgeError):
            target.write_file("/dev/kmsg", (end + "\n").encode())
            _collect(stream, start, end, records)


def _collect(
    stream: Iterator[KmsgRecord | None], start: str, end: str, records: list[KmsgRecord], timeout: float = 15.0
) -> None:
    seen = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = next(stream)
        if rec is None:
            continue
        if rec.text == start:
            seen = True
        elif rec.text == end:
            return
        elif seen:
            records.append(rec)
    progress.warn("the kernel log of this step did not arrive completely")


def _oops_lines(lines: list[str]) -> bool:
    return any(m in line for line in lines for m in OOPS_MARKERS)


# A WARN_ON prints "WARNING: CPU:" and carries on; these leave the kernel in a state
# nothing should be trusted after (the faulting task was killed holding what it held).
_CRASH_MARKERS = tuple(m for m in OOPS_MARKERS if not m.startswith("WARNING"))


def _crash_lines(lines: list[str]) -> bool:
    return any(m in line for line in lines for m in _CRASH_MARKERS)


def _load_error(name: str, err: int | None, other: str, log: list[str], left: bool) -> LoadError:
    ename = errnos.errorcode.get(err, "unknown") if err is not None else "unknown"
    if err in _LOADER_ERRORS:
        why = f"-{ename}: {_LOADER_ERRORS[err]}"
    elif err is not None:
        why = f"its init function returned -{ename} ({os.strerror(err)})"
    else:
        why = other
    body = "\n".join(f"  {line}" for line in log) or "  (the kernel logged nothing)"
    msg = f"loading module {name} failed: {why}\nkernel log of the load:\n{body}"
    if left:
        msg += f"\n{name} is still listed in /proc/modules: the guest needs a restart (kbridge vm down)"
    hint = "kbridge vm down, then up again" if left else "nothing of it stayed loaded; fix it and load again"
    return LoadError(msg, hint, ename, log)


# -- files in and out -------------------------------------------------------------------


_READONLY_TREES = ("/proc", "/sys", "/dev")


def guest_path(path: str, writing: bool) -> str:
    """PATH if it is a plain absolute guest path (no '..', no control characters)."""
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or len(path) > 4096
        or any(ord(c) < 0x20 or c == "\x7f" for c in path)
    ):
        raise KbridgeError(f"invalid guest path {path!r}", "give an absolute path, e.g. /tmp/client")
    norm = posixpath.normpath(path)
    if ".." in path.split("/"):
        raise KbridgeError(f"guest path {path!r} has '..' in it", f"write it out: {norm}")
    if writing and any(norm == t or norm.startswith(t + "/") for t in _READONLY_TREES):
        raise KbridgeError(
            f"guest path {path!r} is a kernel interface, not a place for files",
            "push to /tmp or /root; write kernel interfaces from a test with vm.run",
        )
    return norm + ("/" if path.endswith("/") and norm != "/" else "")


def push(target: Target, local: Path, guest: str) -> str:
    """Copy the local file LOCAL to GUEST in the guest (a path ending in / is a directory); its mode kept."""
    local = Path(local)
    if not local.is_file():
        raise KbridgeError(f"{str(local)!r} is not a file", "push copies one regular file")
    size = local.stat().st_size
    if size > MAX_PUSH_BYTES:
        raise KbridgeError(f"{str(local)!r} is {size >> 20} MiB", f"push moves files up to {MAX_PUSH_BYTES >> 20} MiB")
    dest = guest_path(guest, writing=True)
    if dest.endswith("/") or _guest_is_dir(target, dest):
        dest = posixpath.join(dest, local.name)
        guest_path(dest, writing=True)
    parent = posixpath.dirname(dest)
    res = target.run(["/bin/busybox", "mkdir", "-p", parent], timeout=30)
    if not res.ok:
        raise KbridgeError(f"cannot create {parent!r} in the guest: {res.stderr.decode(errors='replace').strip()}")
    try:
        target.write_file(dest, local.read_bytes())
        res = target.run(["/bin/busybox", "chmod", oct(local.stat().st_mode & 0o777)[2:], dest], timeout=30)
        if not res.ok:
            raise KbridgeError(f"chmod {dest} in the guest failed: {res.stderr.decode(errors='replace').strip()}")
    except BaseException:
        with contextlib.suppress(Exception):
            target.run(["/bin/busybox", "rm", "-f", dest], timeout=10)
        raise
    return dest


def pull(target: Target, guest: str, local: Path) -> Path:
    """Copy the guest file GUEST to LOCAL (into it, if LOCAL is a directory); the path written."""
    src = guest_path(guest, writing=False).rstrip("/")
    local = Path(local)
    if local.is_dir():
        local = local / posixpath.basename(src)
    if not local.parent.is_dir():
        raise KbridgeError(f"local directory {str(local.parent)!r} does not exist")
    if _guest_is_dir(target, src):
        raise KbridgeError(f"{src!r} is a directory in the guest", "pull copies one file")
    try:
        data = target.read_file(src)
    except KbridgeError as e:
        raise KbridgeError(
            f"cannot read {src!r} in the guest: {e.message.split(': ', 1)[-1]}",
            "kbridge vm exec -- ls -l DIR shows what is there",
        ) from None
    tmp = local.with_name(f".{local.name}.kbridge-tmp")
    tmp.write_bytes(data)
    tmp.replace(local)
    return local


def _guest_is_dir(target: Target, path: str) -> bool:
    return target.run(["/bin/busybox", "test", "-d", path], timeout=30).ok


# -- symbols of loaded modules ------------------------------------------------------------


def module_symbols(target: Target) -> dict[str, list[tuple[int, str, str]]]:
    """Symbols of the modules loaded now: name -> [(address, type, module)], from /proc/kallsyms."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    for line in target.read_file("/proc/kallsyms").decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3].startswith("[") and parts[3].endswith("]"):
            out.setdefault(parts[2], []).append((int(parts[0], 16), parts[1], parts[3][1:-1]))
    return out


def split_module_symbol(name: str) -> tuple[str | None, str]:
    """'mod:sym' -> ('mod', 'sym'); 'sym' -> (None, 'sym'); validated as tracefs's MOD:SYM."""
    mod, sep, sym = name.rpartition(":")
    if not sep:
        return None, name
    if not _MODNAME.fullmatch(mod) or len(mod) >= MODULE_NAME_LEN or not _IDENT.fullmatch(sym.split(".", 1)[0]):
        raise SymbolError(f"invalid symbol {name!r}: expected MODULE:FUNCTION", "e.g. mydrv:mydrv_write")
    return mod.replace("-", "_"), sym


def resolve_module_symbol(target: Target, name: str, kernel: SymbolTable | None = None) -> Resolution | None:
    """NAME ('sym' or 'mod:sym') among the functions of the modules loaded now, as MOD:SYM.

    None when a plain name is in no loaded module. A name in several modules (or
    in a module and the kernel, per KERNEL) must be qualified as MOD:SYM, as
    tracefs accepts it and kallsyms_lookup_name resolves it (6.1).
    """
    mod, sym = split_module_symbol(name)
    found = [(a, m) for a, t, m in module_symbols(target).get(sym, ()) if t in _TEXT_TYPES]
    if mod is not None:
        mine = [a for a, m in found if m == mod]
        if not mine:
            mods = loaded_modules(target)
            if mod not in mods:
                raise SymbolError(f"module {mod!r} in {name!r} is not loaded", "kbridge module load DIR first")
            raise SymbolError(
                f"module {mod} has no function {sym!r}",
                f"its symbols: kbridge vm exec -- grep '\\[{mod}\\]' /proc/kallsyms",
            )
        if len(mine) > 1:
            raise SymbolError(f"{name!r} is not unique: {len(mine)} functions of {mod} have that name")
        return Resolution(name, name, mine[0], None)
    if not found:
        return None
    # KERNEL may have been read while modules were loaded: only other addresses are the kernel's.
    in_kernel = bool(kernel and set(kernel.text(sym)) - {a for a, _ in found})
    if len(found) > 1 or in_kernel:
        where = sorted({m for _, m in found}) + (["the kernel"] if in_kernel else [])
        raise SymbolError(
            f"{sym!r} is not unique: it is in {', '.join(where)}",
            f"name it as MODULE:FUNCTION, e.g. {found[0][1]}:{sym}",
        )
    # Qualified, so later steps (kprobe symbol_name, tracefs, ftrace's function list) find this one.
    return Resolution(name, f"{found[0][1]}:{sym}", found[0][0], f"{sym} is in module {found[0][1]}")
