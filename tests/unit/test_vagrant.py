"""Pure parts of the Vagrant target and boxes: Vagrant's machine-readable output, the box
Vagrantfile, and the root shell's framing, run against a real local /bin/sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.images import box
from kbridge.targets import vagrant
from kbridge.targets.vagrant import target as vagrant_target
from kbridge.targets.vagrant.machine import vagrant_message
from kbridge.targets.vagrant.shell import AGENT_SCRIPT, RootShell

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


@pytest.fixture
def shell(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The root shell's script in a local /bin/sh, with its directory moved under TMP_PATH."""
    proc = subprocess.Popen(["/bin/sh", "-s"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    agent = RootShell(proc)
    agent.stdin.write(AGENT_SCRIPT.replace("/run/kbridge", str(tmp_path)).encode())
    agent.stdin.flush()
    agent.ready(10)
    yield agent
    agent.stdin.close()
    proc.wait(timeout=10)


def test_root_shell_framing(shell) -> None:  # type: ignore[no-untyped-def]
    res = shell.run(["/bin/sh", "-c", 'printf "a\\nKB>x 0\\n"; echo err >&2; exit 3'], None, 10)
    assert (res.exitcode, res.stdout, res.stderr, res.signal) == (3, b"a\nKB>x 0\n", b"err\n", None)
    data = bytes(range(256)) * 40
    assert shell.run(["cat"], data, 10).stdout == data  # stdin through base64, binary output
    assert shell.run(["cat"], None, 10).stdout == b""  # stdin is reset between commands
    killed = shell.run(["/bin/sh", "-c", "kill -9 $$"], None, 10)
    assert killed.signal == 9 and not killed.ok
    missing = shell.run(["/nonexistent/prog", "a b"], None, 10)
    assert missing.exitcode == 127 and b"not found" in missing.stderr
    assert shell.run(["echo", "$HOME", "'quoted'", "a;b"], None, 10).stdout == b"$HOME 'quoted' a;b\n"
    with pytest.raises(TimeoutError):
        shell.run(["sleep", "5"], None, 0.3)


def test_root_shell_writes_files(shell, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "f"
    assert shell.run([], b"one\n", 10, write_to=(str(target), "w")).ok
    assert shell.run([], b"two\n", 10, write_to=(str(target), "a")).ok
    assert target.read_bytes() == b"one\ntwo\n"
    assert shell.run([], b"", 10, write_to=(str(target), "w")).ok and target.read_bytes() == b""  # truncates
    bad = shell.run([], b"x", 10, write_to=(str(tmp_path / "no/such/dir"), "a"))
    assert not bad.ok and (b"No such file" in bad.stderr or b"cannot create" in bad.stderr), bad


def test_box_filesystem_owned_by_root_when_built_unprivileged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built without root, mkfs.ext4 -d copies the builder's uid: debugfs gives files to root,
    the vagrant home to uid 1000, and sudo its setuid bit back."""
    if not all(box.shutil.which(t) for t in ("mkfs.ext4", "debugfs")) or box.os.geteuid() != 0:
        pytest.skip("needs e2fsprogs, and root to make files owned by another user")
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "home/vagrant/.ssh").mkdir(parents=True)
    (root / "usr/bin/sudo").write_bytes(b"\x7fELF")
    (root / "usr/bin/sudo").chmod(0o755)  # as an unprivileged dpkg-deb -x leaves it
    (root / "home/vagrant/.ssh/authorized_keys").write_text("ssh-rsa AAAA vagrant\n")
    for p in [root, *root.rglob("*")]:
        box.os.lchown(p, 4321, 4321)
    monkeypatch.setattr(box.os, "geteuid", lambda: 4321)
    box._mkfs(root, tmp_path / "fs.ext4")

    def stat(path: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", f"stat {path}", str(tmp_path / "fs.ext4")], capture_output=True, text=True, check=True
        ).stdout

    assert "User:     0   Group:     0" in stat("/usr/bin/sudo") and "Mode:  04755" in stat("/usr/bin/sudo")
    assert "User:  1000   Group:  1000" in stat("/home/vagrant/.ssh/authorized_keys")
    assert "User:     0   Group:     0" in stat("/usr")


def test_a_kernel_without_kbridge_headers_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine whose kernel is not the one of kbridge's image: modules could not be built for it."""
    from kbridge.images.image import Image

    monkeypatch.setenv("KBRIDGE_STATE", str(tmp_path))
    image = Image(tmp_path / "img", get_arch("x86_64"), "bookworm", "6.1.0-56-amd64", "6.1.192-2")
    monkeypatch.setattr(vagrant_target.images, "ensure", lambda arch: image)
    target = vagrant.VagrantTarget("kbridge-x86_64", "Host kbridge-x86_64\n", "libvirt", {})
    target.arch, target.krel = get_arch("x86_64"), "6.12.48+deb13-amd64"
    with pytest.raises(KbridgeError) as err:
        target._headers_image()
    assert err.value.message == (
        "no kernel headers for 6.12.48+deb13-amd64 (the kernel of vagrant:kbridge-x86_64): "
        "kbridge's x86_64 image has 6.1.0-56-amd64"
    )
    assert "kbridge box build --arch x86_64" in (err.value.hint or "")
    target.krel = "6.1.0-56-amd64"
    assert target._headers_image() is image
    target.release()  # nothing started: only its state directory goes
    assert not list(tmp_path.glob("vg-*"))
