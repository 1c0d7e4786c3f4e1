"""Hostile submissions: what the security audit found, and what else a student could try."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from kbridge import sandbox
from kbridge.sandbox import submission
from tests.sandbox.helpers import HONEST_C, Headers, Secret, build_submission, kbuild_argv, tree_bytes, write_submission

MODULE_TAIL = """
static int __init evil_init(void) { return 0; }
static void __exit evil_exit(void) { }
module_init(evil_init);
module_exit(evil_exit);
MODULE_LICENSE("GPL");
"""


def evil(body: str) -> str:
    return "#include <linux/module.h>\n" + body + MODULE_TAIL


def assert_no_leak(token: str, res: sandbox.Result, work: Path) -> None:
    assert token not in res.output
    assert token.encode() not in tree_bytes(work)


# --- reading host files ---------------------------------------------------------------------------


def test_include_of_a_host_secret_fails_without_leaking(
    tmp_path: Path, headers: Headers, box: sandbox.Sandbox, secret: Secret
) -> None:
    for n, path in enumerate(secret.paths):
        sub = write_submission(tmp_path / f"sub{n}", {"hello.c": evil(f'#include "{path}"\n')})
        work = tmp_path / f"work{n}"
        res = build_submission(sub, headers, work, box)
        assert not res.ok
        assert "No such file or directory" in res.output, res.output
        assert_no_leak(secret.token, res, work)
        assert not (work / "hello.ko").exists()


def incbin_module(path: str) -> str:
    """The audit's exploit: embed a file with .incbin and print it when the module loads."""
    return (
        "#include <linux/module.h>\n"
        f'asm(".section .rodata\\n.global kb_blob\\nkb_blob:\\n.incbin \\"{path}\\"\\n.byte 0\\n.previous");\n'
        "extern const char kb_blob[];\n"
        'static int __init show(void) { pr_info("%s\\n", kb_blob); return 0; }\n'
        "static void __exit bye(void) { }\n"
        'module_init(show);\nmodule_exit(bye);\nMODULE_LICENSE("GPL");\n'
    )


def test_incbin_of_a_host_secret_fails_without_leaking(
    tmp_path: Path, headers: Headers, box: sandbox.Sandbox, secret: Secret
) -> None:
    """The audit's module embedded the file with .incbin and printed it from init: it passed the lab."""
    for n, path in enumerate(secret.paths):
        sub = write_submission(tmp_path / f"sub{n}", {"hello.c": incbin_module(str(path))})
        work = tmp_path / f"work{n}"
        res = build_submission(sub, headers, work, box)
        assert not res.ok
        assert "file not found" in res.output or "No such file" in res.output, res.output
        assert_no_leak(secret.token, res, work)
        assert not (work / "hello.ko").exists()


def test_the_incbin_exploit_is_real_without_the_sandbox(tmp_path: Path, x86: Headers, secret: Secret) -> None:
    """The control: the same submission built the way kbridge builds today (plainly) carries the secret."""
    import subprocess

    work = write_submission(
        tmp_path / "work", {"hello.c": incbin_module(str(secret.paths[0])), "Kbuild": "obj-m := hello.o\n"}
    )
    subprocess.run(
        kbuild_argv(x86, work), check=True, capture_output=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}
    )
    assert secret.token.encode() in (work / "hello.ko").read_bytes()


def test_incbin_of_a_file_inside_the_sandbox_still_builds(tmp_path: Path, x86: Headers) -> None:
    """The control for the test above: .incbin itself works, only the host's files are gone."""
    body = 'asm(".section .rodata\\nkb_blob:\\n.incbin \\"/usr/share/common-licenses/GPL-2\\"\\n.previous");\n'
    sub = write_submission(tmp_path / "sub", {"hello.c": evil(body)})
    res = build_submission(sub, x86, tmp_path / "work")
    assert res.ok, res.output
    assert b"GNU GENERAL PUBLIC LICENSE" in (tmp_path / "work/hello.ko").read_bytes()


def test_proc_self_environ_and_etc_show_nothing_of_the_host(
    tmp_path: Path, x86: Headers, box: sandbox.Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "KBENV" + os.urandom(8).hex()
    monkeypatch.setenv("KBRIDGE_GRADER_TOKEN", token)  # the grader's environment holds a secret
    files = {
        "environ.c": '#include "/proc/self/environ"\n',
        "ppid.c": '#include "/proc/1/environ"\n',
        "shadow.c": '#include "/etc/shadow"\n',
        "passwd.c": '#include "/etc/passwd"\n',
        "hostname.c": '#include "/etc/hostname"\n',
        "ssh.c": '#include "/root/.ssh/id_rsa"\n',
    }
    for name, src in files.items():
        work = tmp_path / f"work-{name}"
        sub = write_submission(tmp_path / f"sub-{name}", {"hello.c": evil(src)})
        res = build_submission(sub, x86, work, box)
        assert token not in res.output and "KBRIDGE_GRADER_TOKEN" not in res.output
        assert token.encode() not in tree_bytes(work)
        if name in ("shadow.c", "passwd.c", "hostname.c", "ssh.c"):
            assert not res.ok
            assert "No such file or directory" in res.output, res.output
        # (cc1 reads a /proc file by its size, 0: that include is empty, and harmless either way)
        assert "root:" not in res.output
    work = tmp_path / "work-incbin"
    sub = write_submission(tmp_path / "sub-incbin", {"hello.c": incbin_module("/proc/self/environ")})
    res = build_submission(sub, x86, work, box)
    assert token.encode() not in tree_bytes(work) and token not in res.output
    # What /proc/self/environ does show: the sandbox's own variables (bwrap adds PWD).
    seen = sandbox.run(["cat", "/proc/self/environ"], ro=[], rw=[], cwd="/", env={}, timeout_s=10,
                       max_output=4096, box=box)  # fmt: skip
    assert sorted(seen.output.strip("\0").split("\0")) == sorted(
        [*(f"{k}={v}" for k, v in sandbox.DEFAULT_ENV.items()), "PWD=/"]
    )


def test_what_the_sandbox_sees(tmp_path: Path, box: sandbox.Sandbox, secret: Secret) -> None:
    """The whole visible tree: the toolchain, the alternatives links, /proc, /dev, a fresh /tmp and
    the named paths; no /root, /home, /var, /run, /opt, /mnt, /srv; no capabilities; uid 65534."""
    (tmp_path / "ro").mkdir()
    script = (
        "ls -A /; echo ---; ls -A /etc; echo ---; ls -A /dev; echo ---; ls -A /usr/local; echo ---; id -u; id -g; "
        "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; echo ---; ls /proc | grep -c '^[0-9]'; "
        f"cat {secret.paths[-1]} 2>&1; touch {tmp_path}/ro/x 2>&1; touch /usr/x 2>&1; hostname"
    )
    res = sandbox.run(["sh", "-c", script], ro=[tmp_path / "ro"], rw=[], cwd="/", env={}, timeout_s=10,
                      max_output=1 << 16, box=box)  # fmt: skip
    assert res.ok or "Read-only" in res.output, res.output
    root_ls, etc_ls, dev_ls, local_ls, ids, rest = res.output.split("---\n")
    top = set(root_ls.split())
    assert top <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "proc", "dev", "tmp"}
    assert {"usr", "etc", "proc", "dev", "tmp"} <= top
    assert etc_ls.split() == ["alternatives"]
    assert set(dev_ls.split()) <= {"console", "core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random",
                                   "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"}  # fmt: skip
    assert local_ls.split() == []
    assert ids.splitlines()[:2] == [str(sandbox.SANDBOX_UID)] * 2
    assert "CapEff:\t0000000000000000" in ids and "CapBnd:\t0000000000000000" in ids and "NoNewPrivs:\t1" in ids
    lines = rest.splitlines()
    assert int(lines[0]) <= 5  # its own pid namespace: bwrap's init, sh, ls, grep
    assert secret.token not in res.output and "No such file or directory" in res.output
    assert rest.count("Read-only file system") == 2
    assert lines[-1] == sandbox.HOSTNAME


def test_no_namespaces_or_privileges_inside(box: sandbox.Sandbox) -> None:
    """Nothing inside can make namespaces of its own (bwrap --disable-userns) or gain privileges."""
    if "--disable-userns" not in box.features:
        pytest.skip("bwrap too old for --disable-userns")
    res = sandbox.run(["sh", "-c", "unshare -U true 2>&1; echo rc=$?; unshare -n true 2>&1; echo rc=$?"], ro=[], rw=[],
                      cwd="/", env={}, timeout_s=10, max_output=4096, box=box)  # fmt: skip
    assert res.output.count("rc=1") == 2, res.output


def test_host_uid_is_nobody_when_root(tmp_path: Path, box: sandbox.Sandbox) -> None:
    """Seen from the host: in mode "nobody" every sandboxed process is uid 65534, not root."""
    if box.mode != "nobody":
        pytest.skip("only mode nobody changes the host uid")
    found: dict[str, object] = {}
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. a kept VM's QEMU

    def go() -> None:
        found["res"] = sandbox.run(["sleep", "3"], ro=[], rw=[], cwd="/", env={}, timeout_s=20, max_output=100, box=box)

    t = threading.Thread(target=go)
    t.start()
    time.sleep(1.5)
    uids = {}
    for p in psutil.Process().children(recursive=True):
        if p.pid in before:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            uids[" ".join(p.cmdline()[:1])] = p.uids().real
    t.join()
    assert found["res"].ok  # type: ignore[attr-defined]
    assert any("sleep" in name for name in uids), uids
    assert set(uids.values()) == {sandbox.SANDBOX_UID}, uids  # bwrap, its init and sleep


# --- links and special files ---------------------------------------------------------------------


def test_symlinked_source_is_refused_before_building(tmp_path: Path, secret: Secret) -> None:
    sub = write_submission(tmp_path / "sub", {"README.md": "mine\n"})
    (sub / "hello.c").symlink_to(secret.paths[0])
    with pytest.raises(sandbox.SubmissionRefused, match=r"'hello\.c' is a symbolic link"):
        sandbox.check_tree(sub)
    with pytest.raises(sandbox.SubmissionRefused):
        sandbox.copy_submission(sub, tmp_path / "work")
    assert not (tmp_path / "work/hello.c").exists()


@pytest.mark.parametrize("where", ["dir", "nested", "top", "inside-tree", "dangling"])
def test_every_symlink_is_refused(tmp_path: Path, where: str) -> None:
    sub = write_submission(tmp_path / "sub", {"hello.c": HONEST_C, "lib/util.h": "#define X 1\n"})
    if where == "dir":
        (sub / "etc").symlink_to("/etc")
    elif where == "nested":
        (sub / "lib/deep").mkdir()
        (sub / "lib/deep/x.h").symlink_to("/etc/passwd")
    elif where == "top":
        link = tmp_path / "link"
        link.symlink_to(sub)
        sub = link
    elif where == "inside-tree":
        (sub / "again.c").symlink_to("hello.c")
    else:
        (sub / "gone.h").symlink_to("/nonexistent")
    with pytest.raises(sandbox.SubmissionRefused, match="symbolic link"):
        sandbox.check_tree(sub)


def test_hard_link_is_refused(tmp_path: Path) -> None:
    sub = write_submission(tmp_path / "sub", {"hello.c": HONEST_C})
    os.link(sub / "hello.c", tmp_path / "elsewhere.c")
    with pytest.raises(sandbox.SubmissionRefused, match="hard link"):
        sandbox.check_tree(sub)


def test_fifo_in_the_submission_is_refused_at_once(tmp_path: Path) -> None:
    sub = write_submission(tmp_path / "sub", {"hello.c": '#include "pipe.h"\n' + HONEST_C})
    os.mkfifo(sub / "pipe.h")
    os.mkfifo(sub / "hello2.c")
    t0 = time.monotonic()
    with pytest.raises(sandbox.SubmissionRefused, match="FIFO"):
        sandbox.check_tree(sub)
    with pytest.raises(sandbox.SubmissionRefused, match="FIFO"):
        sandbox.copy_submission(sub, tmp_path / "work")
    assert time.monotonic() - t0 < 1


def test_socket_and_device_are_refused(tmp_path: Path) -> None:
    sub = write_submission(tmp_path / "sub", {"hello.c": HONEST_C})
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sub / "sock"))
    with pytest.raises(sandbox.SubmissionRefused, match="socket"):
        sandbox.check_tree(sub)
    s.close()
    (sub / "sock").unlink()
    if os.geteuid() == 0:
        os.mknod(sub / "zero", 0o600 | 0o020000, os.makedev(1, 5))  # a character device
        with pytest.raises(sandbox.SubmissionRefused, match="device"):
            sandbox.check_tree(sub)


def test_include_of_a_host_fifo_fails_fast(tmp_path: Path, x86: Headers, box: sandbox.Sandbox) -> None:
    """A FIFO outside the submission is not visible in the sandbox: no such file, at once."""
    fifo = tmp_path / "host.fifo"
    os.mkfifo(fifo)
    sub = write_submission(tmp_path / "sub", {"hello.c": evil(f'#include "{fifo}"\n')})
    # The limit is far above a module build on a loaded 2-core host (~5-20 s): reaching it means a hang.
    res = build_submission(sub, x86, tmp_path / "work", box, timeout_s=90)
    assert not res.ok and not res.timed_out
    assert "No such file or directory" in res.output, res.output


def test_visible_fifo_hangs_only_until_the_time_limit(tmp_path: Path, x86: Headers, box: sandbox.Sandbox) -> None:
    """If a FIFO were visible (here: bound in on purpose, past check_tree), cc1 blocks on it: the time
    limit ends the build and everything it started."""
    (tmp_path / "fifos").mkdir()
    os.mkfifo(tmp_path / "fifos/f.h")
    work = write_submission(tmp_path / "work", {"hello.c": evil(f'#include "{tmp_path}/fifos/f.h"\n'),
                                                "Kbuild": "obj-m := hello.o\n"})  # fmt: skip
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    res = sandbox.run(kbuild_argv(x86, work), ro=[x86.tree, tmp_path / "fifos"], rw=[work], cwd=work,
                      env={"LC_ALL": "C"}, timeout_s=6, max_output=1 << 16, box=box)  # fmt: skip
    took = time.monotonic() - t0
    assert res.timed_out and not res.ok
    assert 6 <= took < 12, took
    assert "time limit" in res.output
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


# --- output, size and time -----------------------------------------------------------------------


def test_huge_output_is_capped(tmp_path: Path, x86: Headers, box: sandbox.Sandbox) -> None:
    warnings = "".join(f'#warning "line {i} xxxxxxxxxxxxxxxx"\n' for i in range(6000))
    sub = write_submission(tmp_path / "sub", {"hello.c": warnings + HONEST_C})
    res = build_submission(sub, x86, tmp_path / "work", box, max_output=32 << 10)
    assert res.truncated
    assert len(res.output.encode()) < (32 << 10) + 400
    assert "output cut at 32768 bytes" in res.output
    assert "line 0 " in res.output  # the first diagnostics are what is kept


def test_endless_output_is_stopped(tmp_path: Path, box: sandbox.Sandbox) -> None:
    t0 = time.monotonic()
    res = sandbox.run(["sh", "-c", "while :; do echo spam spam spam spam; done"], ro=[], rw=[], cwd="/", env={},
                      timeout_s=60, max_output=4096, box=box)  # fmt: skip
    assert time.monotonic() - t0 < 30
    assert res.truncated and not res.timed_out and res.returncode < 0
    assert "stopped after" in res.output and len(res.output) < 5000


def test_huge_object_file_is_stopped_by_the_file_size_limit(tmp_path: Path, x86: Headers, box: sandbox.Sandbox) -> None:
    """asm(".skip N") makes the assembler write N bytes: the file size limit stops it."""
    sub = write_submission(
        tmp_path / "sub", {"hello.c": evil('asm(".section .data\\n.skip 200000000\\n.previous");\n')}
    )
    work = tmp_path / "work"
    res = build_submission(sub, x86, work, box, limits=sandbox.Limits(file_bytes=16 << 20), timeout_s=60)
    assert not res.ok
    assert all(p.stat().st_size <= 16 << 20 for p in work.rglob("*") if p.is_file())


def test_student_makefile_and_kbuild_are_ignored(
    tmp_path: Path, x86: Headers, box: sandbox.Sandbox, secret: Secret
) -> None:
    """Only *.c and *.h are copied; kbridge writes its own Kbuild. A student's Makefile, Kbuild or
    .cmd file (kbuild includes .*.cmd files as makefiles) never reaches make."""
    evil_make = f"$(shell cat {secret.paths[0]} > leaked)\n$(error {{STUDENT MAKEFILE RAN}})\nobj-m := other.o\n"
    sub = write_submission(tmp_path / "sub", {
        "hello.c": HONEST_C,
        "Makefile": evil_make,
        "Kbuild": evil_make,
        ".hello.o.cmd": evil_make,
        "hello.o": b"\x7fELF not really",
        "notes.txt": "my notes\n",
    })  # fmt: skip
    work = tmp_path / "work"
    res = build_submission(sub, x86, work, box)
    assert res.ok, res.output
    assert "STUDENT MAKEFILE RAN" not in res.output
    assert (work / "Kbuild").read_text() == "obj-m := hello.o\n"
    assert not (work / "Makefile").exists() and not (work / "notes.txt").exists() and not (work / "leaked").exists()
    assert (work / "hello.ko").exists()
    assert_no_leak(secret.token, res, work)


def test_too_large_a_tree_is_refused(tmp_path: Path) -> None:
    sub = write_submission(tmp_path / "sub", {f"f{i}.c": "" for i in range(submission.MAX_FILES + 1)})
    with pytest.raises(sandbox.SubmissionRefused, match="more than"):
        sandbox.check_tree(sub)
    big = write_submission(tmp_path / "big", {"hello.c": "x" * (submission.MAX_SOURCE_BYTES + 1)})
    with pytest.raises(sandbox.SubmissionRefused, match="larger than"):
        sandbox.copy_submission(big, tmp_path / "work")
    deep = tmp_path / "deep"
    d = deep
    for i in range(submission.MAX_DEPTH + 2):
        d = d / f"d{i}"
    d.mkdir(parents=True)
    with pytest.raises(sandbox.SubmissionRefused, match="nested deeper"):
        sandbox.check_tree(deep)


def test_git_directory_is_skipped(tmp_path: Path) -> None:
    sub = write_submission(tmp_path / "sub", {"hello.c": HONEST_C, ".git/HEAD": "ref: refs/heads/main\n"})
    (sub / ".git/link").symlink_to("/etc/passwd")  # never entered: not refused, not copied
    sandbox.check_tree(sub)
    assert sandbox.copy_submission(sub, tmp_path / "work") == ["hello.c"]


# --- network -------------------------------------------------------------------------------------


def test_no_network(box: sandbox.Sandbox) -> None:
    """Only a loopback of its own: the host's 127.0.0.1 listener is unreachable, no other interface."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    script = (
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo ---; "
        f"bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>&1 && echo CONNECTED; "
        "bash -c 'exec 3<>/dev/tcp/1.1.1.1/53' 2>&1 && echo CONNECTED; "
        "cat /proc/net/unix | wc -l"
    )
    res = sandbox.run(["sh", "-c", script], ro=[], rw=[], cwd="/", env={}, timeout_s=20, max_output=4096, box=box)
    srv.close()
    ifaces, rest = res.output.split("---\n")
    assert ifaces.split() == ["lo"]
    assert "CONNECTED" not in rest
    assert "Connection refused" in rest and "Network is unreachable" in rest
    assert rest.split()[-1] == "1"  # /proc/net/unix: the header only, no host sockets
