"""`kbridge ARGS` as a user runs it from a shell: this Python's kbridge, nothing on its stdin, text output."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

KBRIDGE = [sys.executable, "-m", "kbridge"]


def run(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`kbridge ARGS` started as start() starts it and run to its end (killed after TIMEOUT seconds)."""
    with start(*args, env=env, cwd=cwd) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start(
    *args: str,
    stdout: int = subprocess.PIPE,
    stderr: int = subprocess.PIPE,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    start_new_session: bool = False,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.Popen[str]:
    """`kbridge ARGS` started and left running: stdout and stderr are pipes unless told otherwise."""
    return subprocess.Popen(
        [*KBRIDGE, *args],
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        start_new_session=start_new_session,
        preexec_fn=preexec_fn,
    )


def gdb_waiting(*args: str, ready: Path, timeout: float = 120) -> subprocess.Popen[str]:
    """`kbridge gdb ARGS` (its output merged on stdout), once its script has touched READY: gdb's piped
    output is block-buffered, so the file is what says it is waiting at `continue`."""
    gdb = start("gdb", *args, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            assert gdb.poll() is None, gdb.communicate()[0]
            assert time.monotonic() < deadline, "gdb did not get ready"
            time.sleep(0.1)
    except BaseException:
        if gdb.poll() is None:
            gdb.kill()
        raise
    return gdb
