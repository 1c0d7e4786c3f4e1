"""A grader interrupted or killed while a sandboxed build hangs leaves nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kbridge import sandbox
from tests.sandbox.helpers import Headers, kbuild_argv, write_submission

HERE = Path(__file__).resolve().parents[2]  # the checkout: kbridge importable from source

CALLER = """\
import json, signal, sys
sys.path.insert(0, {here!r})
# A process started from a non-interactive shell may inherit SIGINT ignored: restore the defaults.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from kbridge import sandbox
box = sandbox.Sandbox(**{box!r})
args = json.loads({args!r})
res = sandbox.run(args["argv"], ro=args["ro"], rw=args["rw"], cwd=args["cwd"], env={{"LC_ALL": "C"}},
                  timeout_s=300, max_output=1 << 16, box=box)
print("RETURNED", res.returncode, flush=True)
"""


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return ""


def compiling(p: psutil.Process, source: str) -> bool:
    """P is the cc1 compiling SOURCE (kbuild runs short-lived cc1s first, probing options)."""
    try:
        return p.name() == "cc1" and any(a.endswith(source) for a in p.cmdline())
    except psutil.NoSuchProcess:
        return False


def alive(procs: list[psutil.Process]) -> list[str]:
    """Those of PROCS still running (is_running() compares the start time: a reused pid is not them)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_signal_to_the_caller_ends_the_hanging_build(
    tmp_path: Path, x86: Headers, box: sandbox.Sandbox, sig: signal.Signals
) -> None:
    (tmp_path / "fifos").mkdir()
    os.mkfifo(tmp_path / "fifos/f.h")  # visible on purpose: cc1 blocks opening it, forever
    work = write_submission(
        tmp_path / "work",
        {"hello.c": f'#include <linux/module.h>\n#include "{tmp_path}/fifos/f.h"\n', "Kbuild": "obj-m := hello.o\n"},
    )
    import json

    args = {"argv": kbuild_argv(x86, work), "ro": [str(x86.tree), str(tmp_path / "fifos")], "rw": [str(work)],
            "cwd": str(work)}  # fmt: skip
    script = tmp_path / "caller.py"
    fields = {"bwrap": box.bwrap, "version": box.version, "mode": box.mode, "features": box.features}
    script.write_text(CALLER.format(here=str(HERE), box=fields, args=json.dumps(args)))
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        tree: list[psutil.Process] = []
        while time.monotonic() < deadline:
            tree = descendants(caller.pid)
            if any(compiling(p, "hello.c") for p in tree):
                break
            assert caller.poll() is None, caller.communicate()
            time.sleep(0.2)
        else:
            pytest.fail("cc1 never started")
        time.sleep(0.5)
        tree = descendants(caller.pid)
        names = {name(p) for p in tree}
        assert {"bwrap", "make", "cc1"} <= names, names
        caller.send_signal(sig)
        t0 = time.monotonic()
        out, err = caller.communicate(timeout=10)
        assert "RETURNED" not in out
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in err
        else:
            assert caller.returncode == -sig
        while alive(tree) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert alive(tree) == [], f"left running after SIG{sig.name}: {alive(tree)}"
        took = time.monotonic() - t0
        assert took < 5
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()


def test_interrupting_run_in_the_caller_kills_the_tree(tmp_path: Path, box: sandbox.Sandbox) -> None:
    """KeyboardInterrupt (or any exception) raised while run() waits: run() kills the sandbox and
    waits for its pid namespace to be gone before the exception propagates."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    fired: list[list[tuple[psutil.Process, str]]] = []

    def interrupt(signum: int, frame: object) -> None:
        # Only what run() started: a test session may have children of its own (a kept VM's QEMU).
        fired.append([(p, name(p)) for p in psutil.Process().children(recursive=True) if p.pid not in before])
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            sandbox.run(["sh", "-c", "sleep 100 & sleep 100 & wait"], ro=[], rw=[], cwd="/", env={},
                        timeout_s=60, max_output=1000, box=box)  # fmt: skip
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired and [n for _, n in fired[0]].count("sleep") == 2, fired
    assert alive([p for p, _ in fired[0]]) == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_background_process_does_not_outlive_the_command(box: sandbox.Sandbox) -> None:
    """A process the command leaves behind (holding stdout) dies with the command: pid namespace."""
    t0 = time.monotonic()
    res = sandbox.run(["sh", "-c", "(sleep 60 &) ; echo done"], ro=[], rw=[], cwd="/", env={}, timeout_s=30,
                      max_output=1000, box=box)  # fmt: skip
    assert res.ok and "done" in res.output
    assert time.monotonic() - t0 < 10
    assert not [p for p in psutil.Process().children(recursive=True) if name(p) == "sleep"]
