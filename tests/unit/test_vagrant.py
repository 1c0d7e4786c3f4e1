"""Pure parts of the Vagrant target and boxes: Vagrant's machine-readable output, the box
Vagrantfile, and kbridge's guest agent, built for and run on this host (its own kernel)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.images import box, boxdisk, programs, vagrantboxes
from kbridge.images.image import Image
from kbridge.targets import vagrant
from kbridge.targets.base import GuestIOError
from kbridge.targets.vagrant import machine
from kbridge.targets.vagrant.agent import OP_RUN, Agent, PipeLines, parse_lineage
from kbridge.targets.vagrant.machine import vagrant_message

# `vagrant status --machine-readable` from this repository's Vagrantfile (vagrant 2.3.4).
STATUS = """\
1795760000,kbridge-x86_64,metadata,provider,libvirt
1795760000,kbridge-arm64,metadata,provider,libvirt
1795760001,kbridge-x86_64,provider-name,libvirt
1795760001,kbridge-x86_64,state,running
1795760001,kbridge-x86_64,state-human-short,running
1795760001,kbridge-arm64,provider-name,libvirt
1795760001,kbridge-arm64,state,not_created
1795760001,kbridge-arm64,state-human-short,not created
1795760001,,ui,info,Current machine states:
"""


def test_parse_status() -> None:
    assert vagrant.parse_status(STATUS) == {
        "kbridge-x86_64": ("running", "libvirt"),
        "kbridge-arm64": ("not_created", "libvirt"),
    }


def test_vagrant_error_message_from_machine_readable_rows() -> None:
    proc = subprocess.CompletedProcess(
        ["vagrant"],
        1,
        stdout=(
            "1795760002,,error-exit,Vagrant::Errors::MachineNotFound,The machine with the name 'nope' was not "
            "found configured for\\nthis Vagrant environment.\n"
        ),
        stderr="",
    )
    msg = vagrant_message(proc)
    assert msg == "The machine with the name 'nope' was not found configured for this Vagrant environment."


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_box_vagrantfile(arch: str) -> None:
    text = box.box_vagrantfile(get_arch(arch))
    assert 'lv.kernel = File.join(dir, "kernel")' in text and 'lv.initrd = File.join(dir, "initrd")' in text
    assert f"console={get_arch(arch).console}" in text and "root=/dev/vda" in text
    assert ("lv.inputs = []" in text) == (arch == "arm64")  # the virt machine has no PS/2


def test_connect_without_vagrant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(KbridgeError) as err:
        vagrant.connect("kbridge-x86_64")
    assert err.value.message == "vagrant is not installed" and "vagrant-libvirt" in (err.value.hint or "")


def test_connect_rejects_a_directory_without_vagrantfile(tmp_path: Path) -> None:
    if shutil.which("vagrant") is None or shutil.which("ssh") is None:
        pytest.skip("vagrant or ssh is not installed")
    with pytest.raises(KbridgeError, match="no Vagrantfile in"):
        vagrant.connect(None, tmp_path)


HOST_ARCH = get_arch(None)


@pytest.fixture
def agent_bin() -> Path:
    """kbridge's agent built for this host (the same build a guest of this arch gets)."""
    if shutil.which(HOST_ARCH.gcc("12")) is None:
        pytest.skip(f"{HOST_ARCH.gcc('12')} is not installed")
    return programs.build(GUEST_DIR / "agent.c", HOST_ARCH)


def _serve(agent_bin: Path, tmp_path: Path, name: str = "conn") -> Agent:
    d = tmp_path / name
    d.mkdir()
    proc = subprocess.Popen(
        [str(agent_bin), "serve", str(d), str(tmp_path / "lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return Agent(proc, "test")


@pytest.fixture
def agent(agent_bin: Path, tmp_path: Path) -> Iterator[Agent]:
    a = _serve(agent_bin, tmp_path)
    a.ready(10, lambda: None)
    yield a
    a.stdin.close()
    a.proc.wait(timeout=10)


def test_agent_runs_commands(agent: Agent) -> None:
    res = agent.run(["/bin/sh", "-c", 'printf "a\\0b"; echo err >&2; exit 3'], None, 10)
    assert (res.exitcode, res.stdout, res.stderr, res.signal) == (3, b"a\0b", b"err\n", None)
    data = bytes(range(256)) * 5000
    assert agent.run(["cat"], data, 10).stdout == data  # binary stdin and stdout, searched in $PATH
    assert agent.run(["cat"], None, 10).stdout == b""  # no stdin left over from the last command
    killed = agent.run(["/bin/sh", "-c", "kill -9 $$"], None, 10)
    assert killed.signal == 9 and killed.exitcode == 137 and not killed.ok
    missing = agent.run(["/nonexistent/prog", "a b"], None, 10)
    assert missing.exitcode == 127 and b"cannot run /nonexistent/prog: errno 2" in missing.stderr
    assert agent.run(["echo", "$HOME", "'quoted'", "a;b"], None, 10).stdout == b"$HOME 'quoted' a;b\n"


def test_agent_stops_a_command_past_its_timeout(agent: Agent, tmp_path: Path) -> None:
    """The command and what it started (its process group) are killed; the agent goes on serving."""
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        agent.run(["/bin/sh", "-c", f"sleep 30 & echo $! > {tmp_path}/child; wait"], None, 0.5)
    assert time.monotonic() - started < 10
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the command's child outlived the timeout"
        time.sleep(0.05)
    assert agent.run(["echo", "still here"], None, 10).stdout == b"still here\n"


def test_agent_spawns_and_reports(agent: Agent) -> None:
    pid = agent.spawn("s1-abc", ["/bin/sh", "-c", "read x; echo got $x; echo e >&2; exit 4"], b"hello\n")
    assert pid > 0 and Path(f"/proc/{pid}").exists()
    res = None
    deadline = time.monotonic() + 10
    while res is None:
        assert time.monotonic() < deadline
        res = agent.status(pid, "s1-abc", 0.5)
    assert (res.exitcode, res.stdout, res.stderr) == (4, b"got hello\n", b"e\n")
    slow = agent.spawn("s2-abc", ["sleep", "30"], None)
    assert agent.status(slow, "s2-abc", 0.0) is None  # still running
    assert agent.kill(slow, 9) == 0
    assert agent.status(slow, "s2-abc", 5.0).signal == 9  # type: ignore[union-attr]
    with pytest.raises(GuestIOError):
        agent.status(slow, "s2-abc", 0.0)  # collected already


def test_agent_files(agent: Agent, tmp_path: Path) -> None:
    f = tmp_path / "f"
    assert agent.write(str(f), b"one\n", "w") == 0
    assert agent.write(str(f), b"two\n", "a") == 0
    assert f.read_bytes() == b"one\ntwo\n"
    assert agent.write(str(f), b"", "w") == 0 and f.read_bytes() == b""  # truncates
    assert agent.write(str(tmp_path / "no/such/dir"), b"x", "a") == errno.ENOENT
    big = os.urandom(3 << 20)  # past one write(2): written in pieces
    assert agent.write(str(f), big, "w") == 0 and f.read_bytes() == big
    assert agent.read_all(str(f)) == big
    assert agent.read_all(str(f), 1000, 24) == big[1000:1024]  # at an offset (pread), at most SIZE
    assert agent.read_all("/proc/self/stat").split()[0].isdigit()  # a file whose size is 0 in stat
    with pytest.raises(OSError) as err:
        agent.read_all(str(tmp_path / "missing"))
    assert err.value.errno == errno.ENOENT
    assert agent.run(["true"], None, 10).ok  # every frame of the failed read was taken


def test_agent_writes_once(agent: Agent, tmp_path: Path) -> None:
    """A tracefs file parses each write(2) as a whole: data up to 1 MiB goes in one, as the agent's
    own write count in /proc/PID/io shows (the other write is its reply)."""

    def writes() -> int:
        return int(re.search(r"^syscw: (\d+)", Path(f"/proc/{agent.proc.pid}/io").read_text(), re.M)[1])  # type: ignore[index]

    before = writes()
    assert agent.write(str(tmp_path / "f"), b"p:kbw ksys_write\n" * 60000, "a") == 0
    assert writes() - before == 2
    before = writes()
    assert agent.write(str(tmp_path / "g"), b"x" * (3 << 20), "w") == 0
    assert writes() - before > 2  # past 1 MiB: in pieces


def test_agent_lineage_and_cleanup(agent_bin: Path, tmp_path: Path) -> None:
    """It says its pid and parents first; at the end of its input it removes its directory."""
    a = _serve(agent_bin, tmp_path)
    helper = a.ready(10, lambda: None)
    assert helper.pid == a.proc.pid and helper.parents[0] == os.getpid()
    a.spawn("s1-x", ["true"], b"in")
    assert (tmp_path / "conn").is_dir()
    a.stdin.close()
    assert a.proc.wait(timeout=10) == 0
    assert not (tmp_path / "conn").exists()


def test_agent_waits_for_the_machine_lock(agent_bin: Path, tmp_path: Path) -> None:
    """A second agent says it is waiting, and is ready once the first one's kbridge has gone."""
    first = _serve(agent_bin, tmp_path, "one")
    first.ready(10, lambda: None)
    second = _serve(agent_bin, tmp_path, "two")
    busy: list[bool] = []
    with pytest.raises(TimeoutError):
        second.ready(1.0, lambda: busy.append(True))
    assert busy == [True]
    first.stdin.close()
    first.proc.wait(timeout=10)
    assert second.ready(10, lambda: busy.append(True)).pid == second.proc.pid
    second.stdin.close()
    second.proc.wait(timeout=10)


def test_agent_ends_a_command_when_kbridge_goes(agent_bin: Path, tmp_path: Path) -> None:
    a = _serve(agent_bin, tmp_path)
    a.ready(10, lambda: None)
    a._send(OP_RUN, ["/bin/sh", "-c", f"echo $$ > {tmp_path}/pid; exec sleep 30"])
    deadline = time.monotonic() + 10
    while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = int((tmp_path / "pid").read_text())
    a.stdin.close()  # kbridge died: its channel ended
    assert a.proc.wait(timeout=10) == 0
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_agent_copy_and_hold(agent_bin: Path, tmp_path: Path) -> None:
    src = tmp_path / "log"
    src.write_bytes(b"one\ntwo\n")
    copy = subprocess.Popen([str(agent_bin), "copy", str(src)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert copy.stdout is not None
    lines = PipeLines(copy.stdout, "log", "test", lambda: None)
    lines.idle = 5
    first = next(lines)
    assert first is not None and parse_lineage(first)[0] == copy.pid
    assert [next(lines), next(lines)] == ["one", "two"]
    copy.stdin.close()  # type: ignore[union-attr]
    assert copy.wait(timeout=10) == 0

    link = tmp_path / "port"
    hold = subprocess.Popen([str(agent_bin), "hold", str(link)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert hold.stdout is not None
    lines = PipeLines(hold.stdout, "port", "test", lambda: None)
    lines.idle = 5
    assert parse_lineage(next(lines) or "")[0] == hold.pid
    assert os.readlink(link) == f"/proc/{hold.pid}/fd/1"
    with open(link, "wb") as w:  # a writer writes straight into the holder's stdout
        w.write(b"hit 1\n")
    assert next(lines) == "hit 1"
    hold.stdin.close()  # type: ignore[union-attr]
    assert hold.wait(timeout=10) == 0 and not link.is_symlink()


def test_ssh_options_from_ssh_config() -> None:
    cfg = (
        "Host kbridge-x86_64\n  HostName 192.168.121.5\n  User vagrant\n  Port 22\n"
        '  IdentityFile "/home/a b/.vagrant.d/insecure_private_key"\n  LogLevel FATAL\n\n'
    )
    assert machine.ssh_options(cfg, "kbridge-x86_64") == [
        *("-o", "HostName 192.168.121.5", "-o", "User vagrant", "-o", "Port 22"),
        *("-o", 'IdentityFile "/home/a b/.vagrant.d/insecure_private_key"', "-o", "LogLevel FATAL"),
    ]


def test_box_filesystem_owned_by_root_when_built_unprivileged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built without root, mkfs.ext4 -d copies the builder's uid: debugfs gives files to root,
    the vagrant home to uid 1000, and sudo its setuid bit back."""
    if not all(boxdisk.shutil.which(t) for t in ("mkfs.ext4", "debugfs")) or boxdisk.os.geteuid() != 0:
        pytest.skip("needs e2fsprogs, and root to make files owned by another user")
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "home/vagrant/.ssh").mkdir(parents=True)
    (root / "usr/bin/sudo").write_bytes(b"\x7fELF")
    (root / "usr/bin/sudo").chmod(0o755)  # as an unprivileged dpkg-deb -x leaves it
    (root / "home/vagrant/.ssh/authorized_keys").write_text("ssh-rsa AAAA vagrant\n")
    for p in [root, *root.rglob("*")]:
        boxdisk.os.lchown(p, 4321, 4321)
    monkeypatch.setattr(boxdisk.os, "geteuid", lambda: 4321)
    boxdisk.mkfs(root, tmp_path / "fs.ext4")

    def stat(path: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", f"stat {path}", str(tmp_path / "fs.ext4")], capture_output=True, text=True, check=True
        ).stdout

    assert "User:     0   Group:     0" in stat("/usr/bin/sudo") and "Mode:  04755" in stat("/usr/bin/sudo")
    assert "User:  1000   Group:  1000" in stat("/home/vagrant/.ssh/authorized_keys")
    assert "User:     0   Group:     0" in stat("/usr")


def test_kcore_segment_offset() -> None:
    """/proc/kcore's PT_LOAD segments map a kernel address to the file offset of its bytes."""
    import struct

    from kbridge.elf import segment_offset

    ehdr = (
        b"\x7fELF"
        + bytes([2, 1, 1])
        + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    )
    note = struct.pack("<IIQQQQQQ", 4, 0, 0x1000, 0, 0, 0x100, 0, 0)
    text = struct.pack("<IIQQQQQQ", 1, 7, 0x2000, 0xFFFFFFFF81000000, 0, 0x1000000, 0x1000000, 0x1000)
    header = ehdr + note + text
    assert segment_offset(header, 0xFFFFFFFF81367680, 16) == 0x2000 + 0x367680
    assert segment_offset(header, 0xFFFFFFFF81000000 + 0x1000000 - 8, 16) is None  # past the segment's end
    assert segment_offset(header, 0xFFFF800000000000, 16) is None
    assert segment_offset(b"not elf" + bytes(100), 0, 16) is None


def _debian_headers_tar(krel: str, common: str) -> bytes:
    """A tar of a Debian guest's kbuild trees as GUEST_TREES lists them (the layout of linux-headers-*)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(path: str, data: bytes = b"", mode: int = 0o644, link: str | None = None) -> None:
            info = tarfile.TarInfo(path)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
            else:
                info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data) if link is None else None)

        add(f"usr/src/linux-headers-{krel}/Makefile", f"include /usr/src/{common}/Makefile\n".encode())
        add(f"usr/src/linux-headers-{krel}/.config", b"CONFIG_KPROBES=y\nCONFIG_MODULES=y\nCONFIG_KPROBE_EVENTS=y\n")
        add(f"usr/src/linux-headers-{krel}/scripts", link="../../lib/linux-kbuild-6.1/scripts")
        add(f"usr/src/{common}/Makefile", b"# the kernel's top Makefile\n")
        add("usr/lib/linux-kbuild-6.1/scripts/basic/fixdep", b"\x7fELF", 0o755)
    return buf.getvalue()


def test_headers_copied_from_a_debian_guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's /lib/modules/KREL/build trees, made to build here: the -common include points beside it."""
    from kbridge.images import foreign

    monkeypatch.setenv("KBRIDGE_CACHE", str(tmp_path))
    krel = "6.1.0-50-amd64"
    kernel = foreign.GuestKernel(get_arch("x86_64"), krel, "Linux version 6.1.0-50-amd64 ...", "debian", "bookworm")
    fetched: list[str] = []
    img = foreign.image_for(kernel, lambda i: fetched.append(i.krel))
    assert img.dir.parent == tmp_path / "foreign" and img.suite == "bookworm" and not img.has_headers()
    foreign.from_guest_tar(img, _debian_headers_tar(krel, "linux-headers-6.1.0-50-common"))
    assert img.has_headers() and fetched == []
    assert (img.headers / "Makefile").read_text() == "include ../linux-headers-6.1.0-50-common/Makefile\n"
    assert (img.headers / "scripts/basic/fixdep").is_file()  # the relative link into linux-kbuild resolves


def test_a_foreign_kernel_without_headers_says_how_to_install_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kbridge.images import foreign

    monkeypatch.setenv("KBRIDGE_CACHE", str(tmp_path))
    kernel = foreign.GuestKernel(
        get_arch("arm64"), "6.8.0-31-generic", "Linux version 6.8.0-31-generic", "ubuntu", "noble"
    )
    assert kernel.suite == "bookworm" and not kernel.debian  # not Debian's archive: no fetching from it

    def refuse(img: Image) -> None:
        raise KbridgeError(f"no kernel headers for {img.krel}", foreign.install_hint(kernel, "box"))

    img = foreign.image_for(kernel, refuse)
    with pytest.raises(KbridgeError) as err:
        img.require_headers()
    assert err.value.hint == (
        "install them in the machine: vagrant ssh box -c 'sudo apt-get install linux-headers-$(uname -r)', "
        "then run this again"
    )
    # A guest that is neither Debian nor Ubuntu: no apt-get command, what its package must provide.
    other = foreign.GuestKernel(get_arch("x86_64"), "6.9.1", "Linux version 6.9.1", "other", "")
    hint = foreign.install_hint(other, "box")
    assert "apt-get" not in hint and "vagrant ssh box" in hint and "/lib/modules/$(uname -r)/build" in hint


def test_machines_using_a_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Vagrant's machine index says which machines a box version serves: those refuse `box remove`."""
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path))
    index = tmp_path / "data/machine-index/index"
    index.parent.mkdir(parents=True)
    index.write_text(
        '{"version":1,"machines":{"a1":{"name":"kbridge-arm64","provider":"libvirt","state":"running",'
        '"vagrantfile_path":"/src/kbridge","extra_data":{"box":{"name":"kbridge/bookworm-arm64",'
        '"provider":"libvirt","version":"0.1.17"}}}}}'
    )
    assert vagrantboxes.machines_using("kbridge/bookworm-arm64") == [("kbridge-arm64", "0.1.17", "/src/kbridge")]
    assert vagrantboxes.machines_using("kbridge/bookworm-x86_64") == []
