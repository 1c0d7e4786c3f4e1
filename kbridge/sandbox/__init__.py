"""Build untrusted code (a student's kernel module) in a bubblewrap sandbox.

(Over 500 lines for one job: how bwrap is found, started and stopped is one piece of security
logic, kept readable top to bottom; what is refused before it starts lives in submission.py.)

A submission is hostile: its C is compiled with the grader's toolchain, and the compiler will read
any file it is pointed at (`#include "/root/x"`, `asm(".incbin ...")`), block on a FIFO forever or
write gigabytes. So kbridge

1. refuses a submission tree that holds anything but regular files and directories, or is too
   large, and copies only its C sources into a build directory it owns (submission.py);
2. runs the build (run) under bwrap: new user, mount, pid, network, ipc, uts and cgroup
   namespaces; a root made of the toolchain (/usr, read-only; /usr/local hidden), the awk/cc
   alternatives links, a fresh /proc of its own pid namespace, a minimal /dev, a small tmpfs
   /tmp, and only the paths the caller names (read-only, or read-write for the build output);
   no network but its own loopback; uid 65534 inside, no capabilities, no new privileges, no
   nested user namespaces, a new session (no TIOCSTI into the grader's terminal); a cleared
   environment; per-process limits (file size, address space, no core files); a wall-time limit
   and an output cap, the whole process tree killed when one is hit, when the caller is
   interrupted, or when the caller dies (--die-with-parent + the pid namespace).

When kbridge runs as root (CI), bwrap itself runs as the host's uid 65534 (mode "nobody", see
launch.py); when it runs as a user, bwrap runs as that user (mode "user"; it needs
unprivileged user namespaces). Root falls back to a privileged bwrap whose sandbox uid 65534 maps
onto host root without capabilities (mode "root-userns") where unprivileged user namespaces are
blocked. If none works, detect() raises SandboxUnavailable: kbridge never builds a submission
unsandboxed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from kbridge.sandbox.errors import SandboxError, SandboxUnavailable, SubmissionRefused
from kbridge.sandbox.submission import check_tree, copy_submission

__all__ = [
    "Limits",
    "Result",
    "Sandbox",
    "SandboxError",
    "SandboxUnavailable",
    "SubmissionRefused",
    "check_tree",
    "copy_submission",
    "detect",
    "run",
]

Mode = Literal["nobody", "root-userns", "user"]

SANDBOX_UID = 65534  # the uid and gid inside the sandbox, and of bwrap itself in mode "nobody"
SANDBOX_GID = 65534
HOSTNAME = "kbridge-sandbox"
LAUNCHER = Path(__file__).with_name("launch.py")
STAGE = "/tmp"  # mode "nobody": where launch.py shows the caller's paths to the unprivileged bwrap
BWRAP_PACKAGE = "bubblewrap"

# Paths the sandbox's own root provides: a caller's bind may not land on or under them.
_RESERVED = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/proc", "/dev")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEFAULT_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/tmp", "TMPDIR": "/tmp"}

Bind = Path | tuple[Path, str]  # a host path shown at the same path, or (host path, sandbox path)


@dataclass(frozen=True)
class Limits:
    """Per-process limits inside the sandbox (setrlimit before bwrap, inherited by everything)."""

    file_bytes: int = 256 << 20  # RLIMIT_FSIZE: `.skip 100000000000` cannot fill the disk
    address_space: int = 4 << 30  # RLIMIT_AS: a macro-expansion bomb stops cc1, not the host
    nofile: int = 1024
    tmp_bytes: int = 256 << 20  # the sandbox's /tmp (tmpfs: memory)

    def rlimits(self) -> dict[str, int]:
        return {
            "RLIMIT_FSIZE": self.file_bytes,
            "RLIMIT_AS": self.address_space,
            "RLIMIT_NOFILE": self.nofile,
            "RLIMIT_CORE": 0,
        }


@dataclass(frozen=True)
class Result:
    """How a sandboxed command ended."""

    returncode: int  # the command's status; negative: killed by that signal (a time or output limit)
    output: str  # stdout and stderr interleaved, at most max_output bytes (+ a note when cut)
    timed_out: bool
    truncated: bool  # output went past max_output (the rest was read and dropped)
    seconds: float
    mode: Mode

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class Sandbox:
    """What detect() found: the bwrap binary, its version and options, and the mode that works."""

    bwrap: str
    version: str
    mode: Mode
    features: frozenset[str] = field(default_factory=frozenset)


# --- detecting bwrap ----------------------------------------------------------------------------

_detected: Sandbox | None = None


def find_bwrap() -> str | None:
    """bwrap from PATH or the usual directories (a grader's PATH may be minimal)."""
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/usr/local/bin:/bin")


def _features(bwrap: str) -> tuple[str, frozenset[str]]:
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    helptext = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    wanted = ("--disable-userns", "--size", "--perms", "--json-status-fd", "--die-with-parent", "--new-session")
    return version, frozenset(opt for opt in wanted if re.search(rf"^\s*{re.escape(opt)}\b", helptext, re.M))


def candidate_modes() -> list[Mode]:
    """The modes to try, strongest first."""
    return ["nobody", "root-userns"] if os.geteuid() == 0 else ["user"]


def detect(*, refresh: bool = False) -> Sandbox:
    """The working sandbox (probed once per process by running `true` in it), or SandboxUnavailable
    with a one-line message saying how to install or enable bwrap."""
    global _detected
    if _detected is not None and not refresh:
        return _detected
    bwrap = find_bwrap()
    if bwrap is None:
        raise SandboxUnavailable(unavailable_message(None))
    version, features = _features(bwrap)
    missing = {"--die-with-parent", "--new-session"} - features
    if missing:
        raise SandboxUnavailable(
            f"refusing to build student code: {version or bwrap} lacks {', '.join(sorted(missing))} and kbridge "
            "never builds a submission unsandboxed; install bubblewrap 0.4 or newer"
        )
    reasons = []
    for mode in candidate_modes():
        box = Sandbox(bwrap, version, mode, features)
        why = probe(box)
        if why is None:
            _detected = box
            return box
        reasons.append(why)
    raise SandboxUnavailable(unavailable_message(reasons[-1]))


def probe(box: Sandbox) -> str | None:
    """None when BOX runs a command (with a read-only and a read-write bind, as a build needs);
    otherwise bwrap's complaint."""
    with tempfile.TemporaryDirectory(prefix="kbridge-sandbox-probe-") as d:
        ro = Path(d, "ro")
        rw = Path(d, "rw")
        ro.mkdir()
        rw.mkdir()
        (ro / "f").write_text("ok\n")
        try:
            res = _run(
                box,
                ["sh", "-c", f"cat {ro}/f > {rw}/g"],
                ro=[ro],
                rw=[rw],
                cwd="/",
                env={},
                timeout_s=20,
                max_output=4096,
                root=None,
                limits=Limits(),
            )
        except SandboxError as e:
            return e.message.removeprefix("the sandbox did not start: ")
        if res.returncode == 0 and (rw / "g").read_text() == "ok\n":
            return None
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        return (lines[0] if lines else f"exit status {res.returncode}")[:300]


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def _seccomp_filtered() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    m = re.search(r"^Seccomp:\s*(\d+)", status, re.M)
    return bool(m and m.group(1) == "2")


def enable_hint(reason: str | None) -> str:
    """What to change so that bwrap can make its namespaces, from this machine's settings."""
    if _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor blocks unprivileged user namespaces (Ubuntu 23.10+): "
            "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or run kbridge as root"
        )
    if _sysctl("kernel.unprivileged_userns_clone") == "0":
        return "sudo sysctl -w kernel.unprivileged_userns_clone=1, or run kbridge as root"
    if _sysctl("user.max_user_namespaces") == "0":
        return "sudo sysctl -w user.max_user_namespaces=15000, or run kbridge as root"
    if _seccomp_filtered():
        return (
            "a seccomp filter (a container's) blocks namespaces: run the container with "
            "--security-opt seccomp=unconfined (or --privileged)"
        )
    return "run kbridge as root, or enable unprivileged user namespaces"


def unavailable_message(reason: str | None) -> str:
    """The one-line refusal `kbridge lab check` prints when it cannot sandbox a build."""
    if reason is None:
        return (
            "refusing to build student code: bwrap (bubblewrap) is not installed and kbridge never "
            f"builds a submission unsandboxed; install it: sudo apt-get install {BWRAP_PACKAGE}"
        )
    return (
        f"refusing to build student code: bwrap cannot create its namespaces here ({reason}) and kbridge "
        f"never builds a submission unsandboxed; {enable_hint(reason)}"
    )


# --- running ------------------------------------------------------------------------------------


def _norm_binds(items: Sequence[Bind]) -> list[tuple[Path, str]]:
    out = []
    for item in items:
        src, dest = (item, str(item)) if isinstance(item, (Path, str)) else (Path(item[0]), str(item[1]))
        src = Path(src).resolve(strict=True)  # the caller's path: trusted, may hold symlinks
        if isinstance(item, (Path, str)):
            dest = str(src)
        pdest = PurePosixPath(dest)
        if not pdest.is_absolute() or ".." in pdest.parts or str(pdest) != os.path.normpath(dest):
            raise SandboxError(f"sandbox path {dest!r} must be absolute and normalized")
        if dest in ("/", "/tmp") or any(dest == r or dest.startswith(r + "/") for r in _RESERVED):
            raise SandboxError(f"sandbox path {dest!r} would hide part of the sandbox's own root")
        out.append((src, dest))
    return out


def _bwrap_args(
    box: Sandbox,
    argv: Sequence[str],
    ro: list[tuple[Path, str]],
    rw: list[tuple[Path, str]],
    cwd: str,
    root: Path | None,
    limits: Limits,
    status_fd: int | None,
) -> tuple[list[str], list[str], list[int]]:
    """bwrap's arguments, and in mode "nobody" the host paths the launcher stages (and which of
    them are read-write). Pure: no process is started."""
    staged: list[str] = []
    staged_rw: list[int] = []

    def host(path: Path, writable: bool = False) -> str:
        """PATH as the bwrap process will see it."""
        if box.mode != "nobody":
            return str(path)
        staged.append(str(path))
        if writable:
            staged_rw.append(len(staged) - 1)
        return f"{STAGE}/{len(staged) - 1}"

    f = box.features
    args = ["--unshare-all", "--unshare-user"]  # --unshare-all only *tries* the user namespace
    if "--disable-userns" in f:
        args.append("--disable-userns")
    args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID), "--hostname", HOSTNAME]
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if status_fd is not None and "--json-status-fd" in f:
        args += ["--json-status-fd", str(status_fd)]

    # The root: the toolchain's /usr and the merged-/usr links (or directories) next to it.
    base = root if root is not None else Path("/")
    base_seen = host(base) if root is not None else "/"

    def inside(rel: str) -> str:
        return f"{base_seen.rstrip('/')}/{rel}"

    args += ["--ro-bind", inside("usr"), "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = base / name
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), f"/{name}"]
        elif p.is_dir():
            args += ["--ro-bind", inside(name), f"/{name}"]
    if (base / "usr/local").is_dir():
        args += ["--tmpfs", "/usr/local"]  # the host's own additions: nothing a build needs
    # /etc: only the alternatives links (awk -> mawk, which kbuild's scripts run). ld.so finds
    # Debian's multiarch libraries without ld.so.cache; passwd, hosts, ssl: not needed.
    if (base / "etc/alternatives").is_dir():
        args += ["--ro-bind", inside("etc/alternatives"), "/etc/alternatives"]
    args += ["--proc", "/proc", "--dev", "/dev"]
    if "--perms" in f:
        args += ["--perms", "1777"]
    if "--size" in f:
        args += ["--size", str(limits.tmp_bytes)]
    args += ["--tmpfs", "/tmp"]
    # Parents before children, so a nested bind is not hidden by its parent's.
    for (src, dest), writable in sorted(
        [(b, False) for b in ro] + [(b, True) for b in rw], key=lambda t: PurePosixPath(t[0][1]).parts
    ):
        args += ["--bind" if writable else "--ro-bind", host(src, writable), dest]
    args += ["--chdir", cwd, "--", *argv]
    return args, staged, staged_rw


def run(
    argv: Sequence[str],
    *,
    ro: Sequence[Bind],
    rw: Sequence[Bind],
    cwd: Path | str,
    env: Mapping[str, str],
    timeout_s: float,
    max_output: int,
    root: Path | None = None,
    limits: Limits = Limits(),
    box: Sandbox | None = None,
) -> Result:
    """Run ARGV in the sandbox and return how it ended.

    RO and RW are host paths shown at the same path inside, or (host path, sandbox path) pairs;
    RW ones are writable (the build output). ROOT, a build root (trixie/sid), replaces the host's
    /usr (and /bin, /lib... links, /etc/alternatives). CWD is a sandbox path. ENV is the whole
    environment (over DEFAULT_ENV). The command is killed with everything it started after
    TIMEOUT_S seconds (timed_out), when its output passes 16 x MAX_OUTPUT bytes (at least 1 MiB),
    when the caller is interrupted (the exception propagates), or when the caller dies. At most
    MAX_OUTPUT bytes of output are kept. BOX defaults to detect(), which raises
    SandboxUnavailable rather than let anything run unsandboxed; a sandbox that fails to start
    raises SandboxError.
    """
    box = box or detect()
    return _run(
        box,
        list(argv),
        ro=ro,
        rw=rw,
        cwd=str(cwd),
        env=env,
        timeout_s=timeout_s,
        max_output=max_output,
        root=Path(root).resolve(strict=True) if root is not None else None,
        limits=limits,
    )


def _run(
    box: Sandbox,
    argv: list[str],
    *,
    ro: Sequence[Bind],
    rw: Sequence[Bind],
    cwd: str,
    env: Mapping[str, str],
    timeout_s: float,
    max_output: int,
    root: Path | None,
    limits: Limits,
) -> Result:
    ro_b = _norm_binds(ro)
    rw_b = _norm_binds(rw)
    if box.mode == "nobody":
        # bwrap and the build run as uid 65534: what they read must be readable by others.
        for src in [s for s, _ in ro_b] + ([root] if root is not None else []):
            st = os.stat(src)
            need = 0o005 if stat.S_ISDIR(st.st_mode) else 0o004
            if st.st_mode & need != need:
                raise SandboxError(
                    f"{src} is not readable by other users, as the sandbox's uid {SANDBOX_UID} must read it",
                    f"chmod -R o+rX {src}",
                )
    full_env = {**DEFAULT_ENV, **env}
    for k, v in full_env.items():
        if not _ENV_KEY.fullmatch(k) or "\0" in v:
            raise SandboxError(f"bad environment entry {k!r}")
    status_r, status_w = os.pipe()
    args, staged, staged_rw = _bwrap_args(box, argv, ro_b, rw_b, cwd, root, limits, status_w)
    spec = {
        "bwrap": box.bwrap,
        "args": args,
        "env": full_env,
        "stage": staged if box.mode == "nobody" else None,
        "stage_rw": staged_rw,
        "uid": SANDBOX_UID,
        "gid": SANDBOX_GID,
        "rlimits": limits.rlimits(),
        "ppid": os.getpid(),
    }
    start = time.monotonic()
    deadline = start + timeout_s
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={},
            cwd="/",
            close_fds=True,
            pass_fds=(status_w,),
            start_new_session=True,  # its own process group: killed as one, apart from the caller's
        )
    finally:
        os.close(status_w)
    assert proc.stdout is not None
    kept = bytearray()
    total = 0
    status = b""
    timed_out = flooded = False
    child_pid = None
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(status_r, selectors.EVENT_READ, "status")
        hard_cap = max(16 * max_output, 1 << 20)
        while sel.get_map() and not flooded:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(remaining, 1.0)):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.data == "status":
                    status += data
                    if child_pid is None and (m := re.search(rb'"child-pid":\s*(\d+)', status)):
                        child_pid = int(m.group(1))
                else:
                    total += len(data)
                    if len(kept) < max_output:
                        kept += data[: max_output - len(kept)]
                    if total > hard_cap:
                        flooded = True
                        break
        sel.close()
        if not timed_out and not flooded:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                timed_out = True  # the output closed but a process lives on
    finally:
        if proc.poll() is None:
            _kill(proc, child_pid)
        proc.stdout.close()
        os.close(status_r)
        if box.mode == "nobody":
            for src, _ in rw_b:
                _chown_back(src)
    seconds = time.monotonic() - start
    text = kept.decode("utf-8", "replace")
    if total > len(kept):
        text += f"\n[kbridge: output cut at {max_output} bytes; {total - len(kept)} more bytes not shown]"
    if flooded:
        text += f"\n[kbridge: the command was stopped after {total} bytes of output]"
    if timed_out:
        text += f"\n[kbridge: the command was stopped at the {timeout_s:g} s time limit]"
    # bwrap reports "exit-code" once the command ran; without it (or without a child at all) bwrap
    # failed to set the sandbox up or to exec the command: a grader problem, not a build result.
    # (An old bwrap without --json-status-fd: its own messages, which lead the output, tell.)
    own = text.startswith(("bwrap:", "kbridge-sandbox:"))
    started = b'"exit-code"' in status if "--json-status-fd" in box.features else not own
    if proc.returncode != 0 and not (timed_out or flooded or started):
        lines = text.splitlines()
        first = next((ln for ln in lines if ln.startswith(("bwrap:", "kbridge-sandbox:"))), text.strip()[:300])
        raise SandboxError(f"the sandbox did not start: {first}")
    return Result(proc.returncode, text, timed_out, total > len(kept), seconds, box.mode)


def _kill(proc: subprocess.Popen[bytes], child_pid: int | None) -> None:
    """Kill bwrap and the sandbox's pid 1 (the kernel then kills the rest of its pid namespace),
    and wait until that pid 1 is gone, so nothing of the sandbox outlives run()."""
    pidfd = None
    if child_pid is not None:
        try:
            pidfd = os.pidfd_open(child_pid)
            # Signal it only if it still is bwrap's child (not a reused pid).
            if Path(f"/proc/{child_pid}/stat").read_text().rsplit(")", 1)[1].split()[1] != str(proc.pid):
                os.close(pidfd)
                pidfd = None
        except (OSError, IndexError):
            pidfd = None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if pidfd is not None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    proc.wait()
    if pidfd is not None:
        try:
            sel = selectors.DefaultSelector()
            sel.register(pidfd, selectors.EVENT_READ)
            sel.select(10)  # readable once the pid namespace's init has exited
            sel.close()
        finally:
            os.close(pidfd)


def _chown_back(top: Path) -> None:
    """Mode "nobody" gave the read-write trees to the sandbox user; give them back to the caller."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        os.chown(top, uid, gid, follow_symlinks=False)
        for dirpath, dirs, files in os.walk(top, followlinks=False):
            for name in dirs + files:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
    except OSError:
        pass
