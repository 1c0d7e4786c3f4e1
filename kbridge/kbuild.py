"""The one module builder: kbridge's generated modules, a user's own module directory and a lab
submission are all built here, with kbuild against an image's headers.

    built = build(files, image, shown="mydriver")        # -> [Built(name, ko, debug_ko, params, warnings)]

FILES (relative path -> bytes) are copied into a fresh directory in the cache and built
there, keyed by their content + kernel release + arch + the headers' version, so an
unchanged module is never rebuilt and a source tree is never written to. Compiler
messages are shown whole (gcc's context and macro-expansion notes included) with
the build copy's paths replaced by SHOWN, the name the user knows the files by.
A module is checked against the kernel's vermagic before it is used; the guest gets
a copy without debug info, the host keeps the one with it (oops lines, gdb).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from kbridge import debuginfo, elf, kernels, progress, sandbox
from kbridge.errors import KbridgeError
from kbridge.images import buildroot, programs
from kbridge.images.image import Image
from kbridge.paths import cache_dir

FORMAT = 3  # bump when the cache layout changes (3: warnings kept with the source's place open)
SOURCE_MARK = "\x00source"  # where a cached build's warnings name the source: no compiler prints a NUL
HOST_GCC = "12"  # the host's (bookworm's) gcc, which builds bullseye's and bookworm's modules
MAX_SOURCE_FILES = 2000
MAX_SOURCE_BYTES = 64 << 20
BUILD_TIMEOUT_S = 600.0
UNTRUSTED_TIMEOUT_S = 120.0  # a lab module builds in seconds; a FIFO or a macro bomb must not hold the grader
UNTRUSTED_OUTPUT = 64 << 10  # bytes of a submission's compiler output shown
MAX_SHOWN_LINES = 60  # of a failed build's compiler output

# Build products, VCS state, tests and docs: kbuild reads none of them, so they are
# neither copied nor part of the cache key.
_SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".tmp_versions"})
_SKIP_SUFFIXES = (
    *(".o", ".ko", ".mod", ".mod.c", ".mod.o", ".cmd", ".a", ".order", ".symvers", ".d", ".tmp"),
    *(".py", ".pyc", ".md", ".rst"),
)
_SKIP_NAMES = frozenset({"Module.symvers", "modules.order", "Module.markers"})
_OBJ_M = re.compile(r"^\s*obj-m\s*[:+]?=", re.MULTILINE)
_OBJ_CONFIG = re.compile(r"^\s*obj-\$\((CONFIG_\w+)\)", re.MULTILINE)
_DIAG = re.compile(
    r"^(?P<file>[^:\s][^:]*):(?P<line>\d+):(?:(?P<col>\d+):)? "
    r"(?P<kind>(?:fatal )?error|warning|note): (?P<msg>.*)$"
)
_MAKE_NOISE = re.compile(r"^make(\[\d+\])?: (Entering|Leaving) directory")


class BuildError(KbridgeError):
    """kbuild failed; the message shows the compiler's diagnostics at the source's own paths."""


@dataclass(frozen=True)
class Built:
    """One .ko built for one kernel."""

    name: str  # as the kernel names it (lsmod, /proc/modules, MOD:SYM)
    ko: Path  # without debug info: what goes to the guest
    debug_ko: Path  # with it: oops lines, gdb, the module's parameters
    krel: str
    arch: str
    params: dict[str, str] = field(default_factory=dict)  # module_param name -> type ("int", "charp", ...)
    warnings: tuple[str, ...] = ()  # compiler warnings, at the source's own paths


# -- sources --------------------------------------------------------------------------


def source_files(src: Path) -> dict[str, bytes]:
    """The files of a module directory SRC (relative path -> bytes), build products left out."""
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


def cache_key(files: Mapping[str, bytes], image: Image, source: Path | None = None) -> str:
    """Content of the source + kernel release + arch + the kernel build itself (its headers'
    Module.symvers and .config: two builds of one release, such as the debug kernel with and
    without KASAN, take different modules) + where the source lives (its debug info names it)."""
    h = hashlib.sha256(f"{FORMAT}|{image.krel}|{image.arch.name}|{image.version}|{source or ''}".encode())
    h.update(kernel_build_digest(image.headers).encode())
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()[:24]


def kernel_build_digest(headers: Path) -> str:
    """A digest of the kernel build HEADERS is for: its Module.symvers (every exported symbol's CRC)
    and .config. Read once per file version."""
    stamps = []
    for name in ("Module.symvers", ".config"):
        try:
            st = (headers / name).stat()
        except OSError:
            stamps.append((name, 0, 0))
            continue
        stamps.append((name, st.st_size, st.st_mtime_ns))
    return _digest_files(str(headers), tuple(stamps))


@functools.lru_cache(maxsize=32)
def _digest_files(headers: str, stamps: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, size, _ in stamps:
        if size:
            h.update(name.encode() + b"\0" + hashlib.sha256((Path(headers) / name).read_bytes()).digest())
    return h.hexdigest()[:16]


# -- kbuild ---------------------------------------------------------------------------


def uses_build_root(image: Image) -> bool:
    """True when IMAGE's kernel needs its suite's own compiler (trixie, sid), see kbridge.images.buildroot."""
    suite = kernels.SUITES.get(image.suite)
    return suite is not None and not suite.host_gcc


def kbuild_argv(image: Image, moddir: Path, source: Path | None = None) -> list[str]:
    """make -C <headers> M=<moddir> ARCH=... CROSS_COMPILE=... modules (an argv, never a shell string).

    bullseye's headers ask for gcc-10 (CC in .kernelvariables): the host's gcc-12 builds
    modules that load on 5.10, so CC is overridden. trixie (gcc-14) and sid (gcc-16) run
    make inside their suite's build root (made on first use) with the headers as shipped.
    A kernel kbridge or the user built (the debug kernel, --kernel-tree) takes the compiler
    its .config names. SOURCE: the directory the module's files came from; the build copy's
    paths in its debug info and __FILE__ (UBSAN reports, WARN lines, gdb) become SOURCE's.
    """
    arch = image.arch
    if uses_build_root(image):
        headers_tree = (image.dir / "headers").resolve()
        root = buildroot.ensure(image.suite, arch, headers_tree)
        return buildroot.wrap(root, headers_tree, moddir, buildroot.make_argv(image.krel, arch))
    # Through the resolved tree: an image flavour's headers are a symlink to the default image's,
    # and the sandbox binds the tree itself, not the link (a bcc image's build found no headers).
    headers = (image.dir / "headers").resolve() / image.headers.relative_to(image.dir / "headers")
    argv = [
        "make",
        "-s",
        "-C",
        str(headers),
        f"M={moddir}",
        f"ARCH={arch.kernel_arch}",
        f"CROSS_COMPILE={arch.cross_compile()}",
        f"CC={built_with(image) or arch.gcc(HOST_GCC)}",
    ]
    # make hands KCFLAGS to a shell: a path with a space or a quote would split; it is left unmapped.
    if source is not None and re.fullmatch(r"[\w./+-]+", f"{moddir}{source}"):
        argv.append(f"KCFLAGS=-ffile-prefix-map={moddir}={source}")
    return [*argv, "modules"]


def built_with(image: Image) -> str | None:
    """The compiler a kernel kbridge or the user built was built with (CONFIG_CC_VERSION_TEXT's first
    word, e.g. gcc-12 or aarch64-linux-gnu-gcc-12) when it is on this host; None for Debian's kernels."""
    if image.flavour not in ("debug", "tree"):
        return None
    try:
        text = (image.headers / ".config").read_text()
    except OSError:
        return None
    m = re.search(r'^CONFIG_CC_VERSION_TEXT="(\S+)', text, re.M)
    return m[1] if m and shutil.which(m[1]) else None


def require_tools(image: Image) -> None:
    """make and the arch's gcc-12 (for kernels the host's compiler builds), or an error naming the packages."""
    if uses_build_root(image):
        return
    if missing := [t for t in ("make", built_with(image) or image.arch.gcc(HOST_GCC)) if shutil.which(t) is None]:
        raise KbridgeError(
            f"cannot build modules: {', '.join(missing)} not found",
            f"sudo apt-get install make {image.arch.gcc_package(HOST_GCC)} (kbridge doctor checks the rest)",
        )


def build(
    files: Mapping[str, bytes], image: Image, shown: str, untrusted: bool = False, source: Path | None = None
) -> list[Built]:
    """Every module (obj-m) FILES make, built for IMAGE's kernel; from the cache when unchanged.

    SHOWN names the source in messages (the user's directory, a lab file's path): the
    build copy's paths are replaced by it. UNTRUSTED code (a student's submission) is built
    in kbridge.sandbox: it sees only the headers, the toolchain and its own files, no network,
    as nobody, with a time and output limit; without a working sandbox it is not built at all.
    Trusted code (kbridge's own modules, the user's own directory and its Makefile) runs
    kbuild as the user does. SOURCE: the directory FILES came from, which the module's debug
    info and __FILE__ then name (gdb, UBSAN's reports).
    """
    source = source.resolve() if source is not None else None
    out = cache_dir() / "kbuild" / cache_key(files, image, source)
    if (cached := _from_cache(out, image, shown)) is not None:
        return _remembered(cached, shown)
    box = sandbox.detect() if untrusted else None  # SandboxUnavailable: refused before anything runs
    image.require_headers()  # a machine's own kernel: its headers are fetched now, or refused
    require_tools(image)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out.parent)
    work = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=out.parent))
    try:
        for rel, data in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(data)
        # A failed build fails its step (shown as failed, never as done before the error).
        with progress.step(f"building {shown} for {image.krel} ({image.arch.name})"):
            raw, code = _make(image, work, source) if box is None else _make_sandboxed(image, work, box, source)
            output = map_paths(raw, work, shown)
            if code != 0:
                raise BuildError(explain_build_failure(output, shown), "fix the code above and build again")
        mods = []
        for ko in sorted(work.rglob("*.ko")):
            data = ko.read_bytes()
            check_vermagic(data, image.krel)
            info = elf.modinfo(data, ko.name)
            debug = ko.with_suffix(".debug.ko")
            shutil.copyfile(ko, debug)
            _strip(image, ko, box)
            mods.append(
                {
                    "name": info.get("name") or ko.stem.replace("-", "_"),
                    "ko": ko.relative_to(work).as_posix(),
                    "debug_ko": debug.relative_to(work).as_posix(),
                    "params": elf.module_params(data),
                }
            )
        if not mods:
            raise BuildError(f"building {shown} produced no .ko file", "check the obj-m line names your objects")
        # The source's place left open: the same files from elsewhere are shown at their own paths.
        warnings = [d for d in diagnostics(map_paths(raw, work, SOURCE_MARK)) if ": warning: " in d]
        (work / "kbridge-build.json").write_text(json.dumps({"modules": mods, "warnings": warnings}))
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)  # a damaged earlier build under the same key
        try:
            work.rename(out)
        except OSError:  # another kbridge built the same source meanwhile: use that one
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result = _from_cache(out, image, shown)
    assert result is not None
    return _remembered(result, shown)


def _remembered(built: list[Built], shown: str) -> list[Built]:
    """Each module, recorded as built from SHOWN: an oops in it is mapped to SHOWN's source lines."""
    for m in built:
        debuginfo.remember_module(m.name, m.krel, m.arch, m.debug_ko, shown)
    return built


def _make(image: Image, work: Path, source: Path | None = None) -> tuple[str, int]:
    """Run kbuild in WORK; its output and exit code. Bounded: a build never hangs kbridge, and an
    interrupted or killed kbridge leaves no make behind (its own session, killed as one; SIGKILL
    to make when kbridge dies)."""
    argv = kbuild_argv(image, work, source)
    if shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C"},
        start_new_session=True,
    )
    _running.add(proc)
    try:
        out, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        raise BuildError(f"the module build did not finish within {BUILD_TIMEOUT_S:.0f} s") from None
    except BaseException:  # Ctrl-C, SIGTERM: the build goes with kbridge
        _kill_session(proc)
        raise
    finally:
        _running.discard(proc)
    return out.decode(errors="replace"), proc.returncode


_running: set[subprocess.Popen[bytes]] = set()  # builds in progress, in any thread


def abort_builds() -> None:
    """Kill every build in progress (a command interrupted while another thread builds)."""
    for proc in list(_running):
        _kill_session(proc)


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _make_sandboxed(image: Image, work: Path, box: sandbox.Sandbox, source: Path | None = None) -> tuple[str, int]:
    """kbuild for untrusted sources, in the sandbox: the headers and the build root read-only."""
    headers_tree = (image.dir / "headers").resolve()
    root = None
    if uses_build_root(image):
        root = buildroot.ensure(image.suite, image.arch, headers_tree)
        argv = buildroot.make_argv(image.krel, image.arch)
        ro: list[sandbox.Bind] = [(headers_tree, buildroot.HEADERS_AT)]
        rw: list[sandbox.Bind] = [(work, buildroot.MODULE_AT)]
        cwd = buildroot.MODULE_AT
    else:
        argv, ro, rw, cwd = kbuild_argv(image, work, source), [headers_tree], [work], str(work)
    res = sandbox.run(
        argv,
        ro=ro,
        rw=rw,
        cwd=cwd,
        env={"LC_ALL": "C"},
        timeout_s=UNTRUSTED_TIMEOUT_S,
        max_output=UNTRUSTED_OUTPUT,
        root=root,
        box=box,
    )
    return res.output, (res.returncode if not res.timed_out else 124)


def _strip(image: Image, ko: Path, box: sandbox.Sandbox | None) -> None:
    """Drop the debug info (most of a module's size; the guest needs none): in the sandbox for untrusted code."""
    argv = [f"{image.arch.cross_compile()}objcopy", "--strip-debug", str(ko)]
    if box is None:
        subprocess.run(argv, check=False, timeout=60, capture_output=True)
    else:
        sandbox.run(argv, ro=[], rw=[ko.parent], cwd=str(ko.parent), env={}, timeout_s=60, max_output=4096, box=box)


def _remove_abandoned(parent: Path) -> None:
    """Build directories of kbridge processes that are gone (killed mid-build)."""
    for d in parent.glob(".build-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def build_generated(name: str, files: Mapping[str, str], image: Image) -> Path:
    """The .ko of one of kbridge's own modules (NAME, rendered FILES), built for IMAGE (cached)."""
    try:
        built = build({k: v.encode() for k, v in files.items()}, image, f"{name}.c")
    except BuildError as e:
        raise BuildError(
            e.message, "this is a kbridge template bug if your input was accepted: please report it"
        ) from None
    return built[0].ko


def pick(built: list[Built], shown: str, name: str | None = None) -> Built:
    """The module NAME of a build (the only one when NAME is None)."""
    if name is None and len(built) == 1:
        return built[0]
    for m in built:
        if m.name == name:
            return m
    names = ", ".join(m.name for m in built)
    if name is None:
        raise KbridgeError(f"{shown!r} builds several modules ({names})", "name the one you want")
    raise KbridgeError(f"{shown!r} builds no module named {name!r} (it builds: {names})")


def _from_cache(out: Path, image: Image, shown: str) -> list[Built] | None:
    try:
        meta = json.loads((out / "kbridge-build.json").read_text())
        warnings = tuple(w.replace(SOURCE_MARK, shown.rstrip("/") or ".") for w in meta.get("warnings", ()))
        mods = [
            Built(
                m["name"],
                out / m["ko"],
                out / m["debug_ko"],
                image.krel,
                image.arch.name,
                dict(m["params"]),
                warnings,
            )
            for m in meta["modules"]
        ]
        for m in mods:
            check_vermagic(m.ko.read_bytes(), image.krel)
        return mods
    except (OSError, ValueError, KeyError, KbridgeError):
        return None


# -- what the compiler said -------------------------------------------------------------


def map_paths(output: str, work: Path, shown: str) -> str:
    """kbuild's output with the build copy's paths replaced by SHOWN, and make's own chatter dropped."""
    shown = shown.rstrip("/") or "."
    # gcc quotes with U+2018/U+2019 when it thinks the terminal takes UTF-8: plain ASCII reads alike.
    output = output.replace("\u2018", "'").replace("\u2019", "'")
    # Inside a suite's build root (kbridge.images.buildroot) the copy is mounted at MODULE_AT.
    for where in (str(work), buildroot.MODULE_AT):
        output = output.replace(where + "/", shown + "/").replace(where, shown)
    return "\n".join(ln for ln in output.splitlines() if not _MAKE_NOISE.match(ln))


_MAKE_ERROR = re.compile(r"^make(\[\d+\])?: \*\*\* \[.*\] Error \d+$")


def diagnostics(output: str) -> list[str]:
    """The compiler's errors and warnings as FILE:LINE[:COL]: KIND: MESSAGE lines."""
    return [raw.strip() for raw in output.splitlines() if (m := _DIAG.match(raw.strip())) and m["kind"] != "note"]


def explain_build_failure(output: str, shown: str) -> str:
    """A failed build as gcc reported it: every line of its diagnostics (the function it was in, the
    macro expansions that lead from a header back to the source's line, the caret), capped."""
    # make's own "*** [...] Error N" lines only repeat that the compiler failed.
    lines = [ln for ln in output.strip().splitlines() if ln.strip() and not _MAKE_ERROR.match(ln)]
    first = next((i for i, ln in enumerate(lines) if (m := _DIAG.match(ln.strip())) and "error" in m["kind"]), None)
    if first is not None:
        # From the context gcc printed before the first error ("In function ...", "In file included from").
        while first > 0 and (
            lines[first - 1].startswith(("In file included from", "                 from"))
            or ": In function" in lines[first - 1]
            or ": In " in lines[first - 1]
        ):
            first -= 1
        lines = lines[first:]
    body = "\n".join(lines[:MAX_SHOWN_LINES])
    if len(lines) > MAX_SHOWN_LINES:
        body += f"\n... {len(lines) - MAX_SHOWN_LINES} more lines"
    return f"building {shown} failed:\n{body}"


def check_vermagic(ko: bytes, krel: str) -> str:
    """The module's vermagic, if it was built for KREL; otherwise a KbridgeError."""
    vermagic = elf.modinfo(ko).get("vermagic", "")
    if vermagic.split(" ", 1)[0] != krel:
        raise KbridgeError(
            f"module vermagic {vermagic!r} does not match the guest kernel {krel}",
            "it was built for another kernel; kbridge rebuilds it",
        )
    return vermagic


# -- guest programs ------------------------------------------------------------------------


def build_guest_program(source: Path, image: Image) -> Path:
    """SOURCE (a freestanding C program: no libc) built static for IMAGE's arch, once, cached."""
    return programs.build(source, image.arch)
