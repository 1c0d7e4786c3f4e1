"""The last step before bwrap: limits, the parent-death signal and (as root) the drop to nobody.

Run by kbridge.sandbox.run() as `python -I -S launch.py SPEC_JSON`; it execs bwrap in the same
process, so bwrap's parent is sandbox.run()'s caller and --die-with-parent refers to it. Only the
standard library is used (the interpreter runs isolated, without site-packages).

Mode "nobody" (the caller is root): bwrap runs as the host's uid 65534 instead of root, so a
sandboxed process that got past the mounts would still hold no root-owned file. An unprivileged
bwrap cannot reach the caller's paths under /root (mode 0700), so this launcher first makes a
private mount namespace (still root), opens each path the sandbox needs, mounts a tmpfs over /tmp
*in that namespace only* and bind-mounts each path at /tmp/<n>, chowns the read-write trees to the
sandbox user, drops to it and execs bwrap, which binds /tmp/<n> to where the sandbox wants it.
Nothing changes in the host's mount table.

On any failure the launcher prints one line starting with "kbridge-sandbox:" and exits 127.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
STAGE = "/tmp"  # sandbox.STAGE

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            src.encode() if src else None,
            dst.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {src} on {dst}",
    )


def _chown_tree(top: str, uid: int, gid: int) -> None:
    """lchown TOP and everything under it (symlinks are changed, never followed)."""
    os.chown(top, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(top, followlinks=False):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _stage(paths: list[str], rw: list[int], uid: int, gid: int) -> None:
    """Show PATHS at /tmp/0, /tmp/1, ... in a private mount namespace; chown the RW ones to UID."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    # Opened after unshare (a bind source must belong to this namespace) and before the tmpfs
    # hides /tmp (the caller's paths may be under it).
    fds = [os.open(p, os.O_PATH | os.O_CLOEXEC) for p in paths]
    _mount("kbridge-stage", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for n, fd in enumerate(fds):
        dst = f"{STAGE}/{n}"
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.mkdir(dst)
        else:
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
        _mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | MS_REC)
        os.close(fd)
    for n in rw:
        _chown_tree(f"{STAGE}/{n}", uid, gid)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    os.umask(0o022)
    if spec["stage"] is not None:
        _stage(spec["stage"], spec["stage_rw"], spec["uid"], spec["gid"])
    for name, value in spec["rlimits"].items():
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # never raised
        resource.setrlimit(which, (value, value))
    # A credential change clears the parent-death signal, so it is set after the drop; then the
    # parent is checked, in case the caller died before this line ran.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != spec["ppid"]:
        raise OSError("the caller is gone")
    os.execve(spec["bwrap"], [spec["bwrap"], *spec["args"]], spec["env"])


if __name__ == "__main__":
    try:
        main(sys.argv)
    except Exception as e:  # noqa: BLE001 (any failure: one line for sandbox.run(), which raises SandboxError)
        print(f"kbridge-sandbox: {e}", file=sys.stderr, flush=True)
        os._exit(127)
