"""Vagrant as a kbridge target: a real `vagrant up`, on x86_64 and arm64 (TCG), as a Vagrant user meets it.

libvirtd, its management network and the guests live in a network namespace the
test creates and removes (tests/vagrant/libvirt_netns.py), and `vagrant up` runs in
it. kbridge runs as a user runs it, in the host's namespace (it fetches Debian
packages from there); its SSH connections reach the machines through a proxy in the
namespace (`ip netns exec NS nc`, Vagrant's config.ssh.proxy_command, set in the
test's own VAGRANT_HOME). The machines are the repository's Vagrantfile's,
from the boxes kbridge builds, plus (x86_64) a box kbridge did not build: made
here the way public Debian boxes are (tests/vagrant/debian_box.py). Every count is
compared with the embedded VM's for the same command. The host namespace's
addresses must be unchanged at the end.

Needs root and the packages in tests/vagrant/libvirt_netns.APT_PACKAGES (the
README's test command installs them). About 15 minutes on a 2-core host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kbridge
from kbridge import kbuild, netns
from kbridge.arch import get_arch
from kbridge.images import box as boxes
from kbridge.images import foreign, vagrantboxes
from kbridge.images.apt import PrivateApt, host_mirrors
from kbridge.images.image import Image
from kbridge.mechanisms.kmod.render import render
from kbridge.paths import cache_dir, state_dir
from kbridge.spec import ProbeSpec, make_spec
from kbridge.targets.vagrant import connect
from tests.vm import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vagrant"))
from debian_box import build_debian_box
from libvirt_netns import (
    APT_PACKAGES,
    LIBVIRT_SOCK,
    LibvirtInNetns,
    _answers,
    apt_install,
    missing_tools,
    remove_stale_domain,
    virsh,
)

# One libvirtd at a time (its socket path is fixed): both arches on one xdist worker.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vagrant")]
REPO = Path(__file__).resolve().parents[2]
MACHINES = {"x86_64": "kbridge-x86_64", "arm64": "kbridge-arm64"}
DD = "dd if=/dev/zero of=/dev/null bs=1 count={n} status=none"  # exactly N write(2) calls by comm dd
TIMINGS: dict[str, float] = {}


def _host_addresses() -> str:
    return subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def vagrant_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtInNetns]:
    """libvirtd in a fresh network namespace, Vagrant pointed at the repo's Vagrantfile."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test creates a network namespace and runs libvirtd in it")
    if (missing := missing_tools()) and os.environ.get("CI") == "true":
        proc = apt_install()  # CI machines are fresh: install what the test needs
        assert proc.returncode == 0, proc.stderr[-2000:]
        missing = missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install --no-install-recommends {' '.join(APT_PACKAGES)}")
    if _answers(LIBVIRT_SOCK) and os.environ.get("CI") != "true":
        # A workstation's own libvirtd keeps its default network in the host namespace; the test
        # only ever uses a libvirtd it starts in a namespace of its own.
        pytest.skip(
            f"the host's libvirtd answers on {LIBVIRT_SOCK}: stop it (systemctl stop libvirtd) "
            "to run the Vagrant tests, which start their own inside a network namespace"
        )
    before = _host_addresses()
    work = tmp_path_factory.mktemp("vagrant")
    env = LibvirtInNetns(work)
    saved = dict(os.environ)
    os.environ.update(
        {
            # Boxes added once and reused across runs; QEMU (root here) reads kernel/initrd from it.
            "VAGRANT_HOME": os.environ.get("KBRIDGE_VAGRANT_HOME", str(cache_dir() / "vagrant-home")),
            "VAGRANT_DOTFILE_PATH": str(work / "dot-vagrant"),
            "VAGRANT_CWD": str(REPO),
            "VAGRANT_DEFAULT_PROVIDER": "libvirt",
            "LIBVIRT_DEFAULT_URI": "qemu:///system",
            "VAGRANT_CHECKPOINT_DISABLE": "1",  # no version check against the internet
        }
    )
    os.environ.pop("VAGRANT_BOX_UPDATE_CHECK_DISABLE", None)  # the box check is local: it must not warn
    env.start()
    proxy = Path(os.environ["VAGRANT_HOME"]) / "Vagrantfile"  # merged into every Vagrantfile's config
    proxy.parent.mkdir(parents=True, exist_ok=True)
    proxy.write_text(
        "# kbridge's Vagrant tests: SSH reaches the machines through the test's network namespace.\n"
        f'Vagrant.configure("2") {{ |c| c.ssh.proxy_command = "ip netns exec {env.name} nc %h %p" }}\n'
    )
    try:
        yield env
    finally:
        proxy.unlink(missing_ok=True)
        env.stop()
        os.environ.clear()
        os.environ.update(saved)
        after = _host_addresses()
        assert after == before, f"the host namespace changed:\nbefore:\n{before}\nafter:\n{after}"
        if TIMINGS:
            print("\nvagrant timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(TIMINGS.items())))


def _vagrant(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["vagrant", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def summary(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])["summary"]


UP_OUTPUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def machines(vagrant_env: LibvirtInNetns) -> Iterator[Callable[[str], str]]:
    """up(ARCH): the repository's machine of ARCH, built, added and up (once); destroyed at the end."""
    started: list[str] = []

    def up(arch_name: str) -> str:
        machine = MACHINES[arch_name]
        if machine in started:
            state = _vagrant("status", machine, "--machine-readable").stdout
            if ",state,running" in state:
                return machine
        else:
            t0 = time.monotonic()
            box = boxes.ensure(get_arch(arch_name))
            vagrantboxes.vagrant_add(box)
            TIMINGS[f"{arch_name} box build/check + add"] = time.monotonic() - t0
            remove_stale_domain(f"{REPO.name}_{machine}")  # vagrant-libvirt's domain name: <dir>_<machine>
            started.append(machine)
        with netns.entered(vagrant_env.name):
            t0 = time.monotonic()
            proc = _vagrant("up", machine)
            TIMINGS.setdefault(f"{arch_name} vagrant up", time.monotonic() - t0)
        assert proc.returncode == 0, f"vagrant up failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        UP_OUTPUT.setdefault(machine, proc.stdout + proc.stderr)
        return machine

    yield up
    with netns.entered(vagrant_env.name):
        for machine in started:
            down = _vagrant("destroy", "-f", machine)
            assert down.returncode == 0, down.stderr
    assert not [n for n in virsh("list", "--all", "--name").stdout.split() if n.startswith(f"{REPO.name}_kbridge")]


# -- counts: the same command counts the same on the embedded VM and on each machine -----


@pytest.mark.parametrize("arch_name", ["x86_64", "arm64"])
def test_counts_equal_the_embedded_vm(
    vagrant_env: LibvirtInNetns, machines: Callable[[str], str], arch_name: str
) -> None:
    """Without --comm the whole guest is counted, with it the workload's task: never kbridge's plumbing."""
    machine = machines(arch_name)
    target = f"vagrant:{machine}"
    commands = {
        "probe, default workload": ["probe", "sys_write", "--pre"],
        "probe, dd --comm": ["probe", "ksys_write", "--pre", "--comm", "dd", "--run", DD.format(n=100)],
        "probe, dd": ["probe", "ksys_write", "--pre", "--run", DD.format(n=50)],
        "probe via tracefs, dd": ["probe", "ksys_write", "--pre", "--via", "tracefs", "--run", DD.format(n=20)],
        "trace, default workload": ["trace", "p:sys_write_event sys_write"],
    }
    for what, argv in commands.items():
        t0 = time.monotonic()
        on_machine = summary(cli.run(*argv, "--target", target, "--json"))
        if what == "probe, dd --comm":
            TIMINGS[f"{arch_name} kbridge probe (one command)"] = time.monotonic() - t0
        embedded = summary(cli.run(*argv, "--arch", arch_name, "--json"))
        counts = {
            where: {m: r["counters"] for m, r in s["mechanisms"].items()}
            for where, s in (("vagrant", on_machine), ("embedded", embedded))
        }
        assert counts["vagrant"] == counts["embedded"], f"{what}: {counts}"
        assert on_machine["arch"] == arch_name and on_machine["target"] == target
        # The same label for the same accelerator on both arches (the guest's kernel found no KVM).
        assert on_machine["accel"] == "libvirt/tcg", on_machine
    # The Python API counts the same way.
    with kbridge.vm(target=target) as vm:
        assert vm.arch == arch_name
        run = vm.probe("ksys_write", pre=True, comm="dd", run=DD.format(n=30))
        assert run.counts == {"pre": 30} and len(run.hits) == 30


@pytest.mark.parametrize("arch_name", ["x86_64", "arm64"])
def test_readme_python_example_prints_what_it_says(
    vagrant_env: LibvirtInNetns, machines: Callable[[str], str], arch_name: str
) -> None:
    """The README's Python example, on the machine instead of the embedded VM: the values in its comments."""
    block = re.search(r"```python\nimport kbridge\n\nwith kbridge\.vm.*?\n```", (REPO / "README.md").read_text(), re.S)
    assert block is not None
    said = dict(re.findall(r"^\s*(run\.counts|vm\.trace\(.*?\)\.counters)\s+# (\{[^}]*\})", block.group(0), re.M))
    assert set(said) == {"run.counts", 'vm.trace("p:myw ksys_write fd=$arg1", run="echo hi > /tmp/x").counters'}
    machine = machines(arch_name)
    with kbridge.vm(target=f"vagrant:{machine}") as vm:
        first = re.search(r"run = (vm\.probe\(.*?\))\n", block.group(0), re.S)
        assert first is not None
        run = eval(first.group(1), {"vm": vm})  # the README's own call
        assert repr(run.counts) == said["run.counts"]
        traced = vm.trace("p:myw ksys_write fd=$arg1", run="echo hi > /tmp/x").counters
        assert repr(traced) == said['vm.trace("p:myw ksys_write fd=$arg1", run="echo hi > /tmp/x").counters']


# -- one connection per command and per Guest -----------------------------------------


def _ssh_connections_counter(ns: str) -> Callable[[], int]:
    """New TCP connections to port 22 made in the namespace (an iptables counting rule in it: the
    SSH proxy connects from there)."""
    rule = ["OUTPUT", "-p", "tcp", "--dport", "22", "--syn"]
    subprocess.run(["ip", "netns", "exec", ns, "iptables", "-I", *rule], check=True)

    def count() -> int:
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "iptables", "-L", "OUTPUT", "-v", "-x", "-n"], capture_output=True, text=True
        ).stdout
        m = re.search(r"^\s*(\d+)\s+\d+\s+(?:tcp|6)\s.*dpt:22 flags:0x17/0x02", out, re.M)  # iptables-nft: "6"
        assert m is not None, out
        return int(m.group(1))

    return count


@pytest.mark.parametrize("arch_name", ["x86_64", "arm64"])
def test_one_connection_per_command_and_per_guest(
    vagrant_env: LibvirtInNetns, machines: Callable[[str], str], arch_name: str
) -> None:
    machine = machines(arch_name)
    count = _ssh_connections_counter(vagrant_env.name)
    try:
        for argv in (
            ["probe", "ksys_write", "--pre", "--comm", "dd", "--run", DD.format(n=5)],  # arch asked, then probed
            ["trace", "p:kbw ksys_write", "--comm", "dd", "--run", DD.format(n=5)],
            ["vm", "exec", "--target", f"vagrant:{machine}", "--", "true"],
            ["inspect", "ksys_write"],
        ):
            before = count()
            t0 = time.monotonic()
            proc = cli.run(*argv, *([] if "--" in argv else ["--target", f"vagrant:{machine}"]))
            TIMINGS.setdefault(f"{arch_name} kbridge {argv[0]} {argv[1]}", time.monotonic() - t0)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert count() - before == 1, f"{argv}: {count() - before} SSH connections"
        before = count()
        t0 = time.monotonic()
        with kbridge.vm(target=f"vagrant:{machine}") as vm:
            TIMINGS[f"{arch_name} Guest connect"] = time.monotonic() - t0
            for _ in range(3):
                t0 = time.monotonic()
                assert vm.probe("ksys_write", pre=True, comm="dd", run=DD.format(n=3)).counts == {"pre": 3}
                TIMINGS[f"{arch_name} Guest.probe (connected)"] = time.monotonic() - t0
            t0 = time.monotonic()
            assert vm.run("true").ok
            TIMINGS[f"{arch_name} Guest.run (connected)"] = time.monotonic() - t0
            assert vm.trace("p:kbw ksys_write", run=DD.format(n=2), comm="dd").counters == {"kprobes/kbw": 2}
            assert vm.inspect("ksys_write").mode in ("ftrace", "breakpoint")
            assert vm.kernel_log().strip()
        assert count() - before == 1
    finally:
        subprocess.run(
            ["ip", "netns", "exec", vagrant_env.name, "iptables", "-D", "OUTPUT", "-p", "tcp", "--dport", "22", "--syn"]
        )


# -- the machine's arch everywhere, its own hostname, the hints ----------------------------


def test_machines_have_their_own_hostnames(vagrant_env: LibvirtInNetns, machines: Callable[[str], str]) -> None:
    names = {}
    for arch_name in MACHINES:
        proc = cli.run("vm", "exec", "--target", f"vagrant:{machines(arch_name)}", "--", "hostname")
        assert proc.returncode == 0, proc.stderr
        names[arch_name] = proc.stdout.strip()
    assert names == {"x86_64": "kbridge-x86-64", "arm64": "kbridge-arm64"}


def test_vagrant_up_says_nothing_about_the_catalog(vagrant_env: LibvirtInNetns, machines: Callable[[str], str]) -> None:
    """The box catalog stays in the cache: `vagrant up` (with its box update check on) has no warning."""
    for arch_name in MACHINES:
        out = UP_OUTPUT.get(machines(arch_name), "")
        assert "catalog" not in out.lower() and "warn" not in out.lower(), out[-2000:]
        again = _vagrant("up", MACHINES[arch_name])  # running already: the box check still runs
        assert again.returncode == 0 and "catalog" not in (again.stdout + again.stderr).lower(), again.stdout


def test_pytest_plugin_takes_the_machines_arch(
    vagrant_env: LibvirtInNetns, machines: Callable[[str], str], tmp_path: Path
) -> None:
    """Only --kbridge-target vagrant:kbridge-arm64: the tests run on arm64 only, on that machine."""
    machine = machines("arm64")
    (tmp_path / "test_mine.py").write_text(
        textwrap.dedent(
            """
            def test_writes(kbridge_vm):
                assert kbridge_vm.arch == "arm64" and kbridge_vm.name == "vagrant:kbridge-arm64"
                dd = "dd if=/dev/zero of=/dev/null bs=1 count=4 status=none"
                run = kbridge_vm.probe("ksys_write", comm="dd", run=dd)
                assert run.counts == {"pre": 4}

            def test_runs(kbridge_vm):
                assert kbridge_vm.run("uname -m").text.strip() == "aarch64"
            """
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-v",
            str(tmp_path),
            "--kbridge-target",
            f"vagrant:{machine}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ran = re.findall(r"test_mine\.py::(\S+) PASSED", proc.stdout)
    assert sorted(ran) == ["test_runs[arm64-bookworm]", "test_writes[arm64-bookworm]"], proc.stdout[-2000:]


def test_module_commands_take_the_machines_arch(vagrant_env: LibvirtInNetns, machines: Callable[[str], str]) -> None:
    """`kbridge module load --target vagrant:kbridge-arm64` with no --arch: built for arm64, loaded, probed."""
    target = f"vagrant:{machines('arm64')}"
    load = cli.run("module", "load", str(REPO / "examples/chardev"), "--target", target)
    assert load.returncode == 0 and "loaded in the arm64 guest" in load.stderr, load.stderr[-2000:]
    try:
        s = summary(
            cli.run(
                "probe", "kbchardev_write", "--ret", "--run", "echo hi > /dev/kbchardev", "--target", target, "--json"
            )
        )
        assert s["arch"] == "arm64" and s["mechanisms"]["kmod"]["hits"] == 1
    finally:
        unload = cli.run("module", "unload", "kbchardev", "--target", target)
        assert unload.returncode == 0, unload.stderr[-2000:]


def test_vagrantfile_option(vagrant_env: LibvirtInNetns, machines: Callable[[str], str], tmp_path: Path) -> None:
    """Away from the Vagrantfile, the hint names an option that exists, and that option works."""
    machine = machines("x86_64")
    env = {k: v for k, v in os.environ.items() if k != "VAGRANT_CWD"}
    lost = cli.run("vm", "exec", "--target", "vagrant", "--", "true", cwd=tmp_path, env=env)
    assert lost.returncode == 2 and "no Vagrantfile in the current directory" in lost.stderr, lost.stderr
    assert "--vagrantfile DIR" in lost.stderr and len(lost.stderr.strip().splitlines()) <= 2
    found = cli.run(
        "vm",
        "exec",
        "--target",
        f"vagrant:{machine}",
        "--vagrantfile",
        str(REPO),
        "--",
        "uname",
        "-m",
        cwd=tmp_path,
        env=env,
    )
    assert found.returncode == 0 and found.stdout.strip() == "x86_64", found.stderr
    bad = cli.run(
        "vm", "exec", "--target", "vagrant", "--vagrantfile", str(tmp_path), "--", "true", cwd=tmp_path, env=env
    )
    assert bad.returncode == 2 and f"invalid --vagrantfile {str(tmp_path)!r}" in bad.stderr, bad.stderr


def test_bpf_on_a_vagrant_machine_counts_like_kmod(vagrant_env: LibvirtInNetns, machines: Callable[[str], str]) -> None:
    """--via bpf needs nothing in the box: kbridge's loader and CO-RE object are pushed on first use."""
    machine = machines("x86_64")
    s = summary(
        cli.run(
            "probe",
            "ksys_write",
            "--pre",
            "--via",
            "bpf",
            "--comm",
            "dd",
            "--run",
            DD.format(n=7),
            "--json",
            "--target",
            f"vagrant:{machine}",
        )
    )
    assert s["mechanisms"]["bpf"]["counters"]["pre"] == 7, s


# -- concurrency, kill -9, the vagrant ssh habit -----------------------------------------


def _guest_processes(machine: str) -> str:
    proc = cli.run("vm", "exec", "--target", f"vagrant:{machine}", "--", "ps", "-eo", "pid,ppid,args")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_two_probes_at_once(vagrant_env: LibvirtInNetns, machines: Callable[[str], str]) -> None:
    """The second waits for the machine's lock, both count exactly, nothing of either stays in the guest."""
    machine = machines("arm64")
    args = ("probe", "ksys_write", "--pre", "--comm", "dd", "--target", f"vagrant:{machine}", "--json")
    # The first holds the machine for a while (its workload sleeps after dd, which --comm dd does not
    # count): the second, started meanwhile, finds the machine busy whatever the host's speed.
    first = cli.start(*args, "--run", DD.format(n=40) + "; sleep 15")
    time.sleep(1.0)
    second = cli.start(*args, "--run", DD.format(n=60))
    out1, err1 = first.communicate(timeout=900)
    out2, err2 = second.communicate(timeout=900)
    assert first.returncode == 0 and second.returncode == 0, err1[-2000:] + err2[-2000:]
    hits = sorted(json.loads(o.splitlines()[-1])["summary"]["mechanisms"]["kmod"]["hits"] for o in (out1, out2))
    assert hits == [40, 60]
    assert "waiting for another kbridge command using" in err1 + err2
    ps = _guest_processes(machine)
    assert "/dev/kmsg" not in ps and ps.count("agent serve") == 1, ps  # only this exec's own agent


def test_kill_9_leaves_nothing_behind(vagrant_env: LibvirtInNetns, machines: Callable[[str], str]) -> None:
    machine = machines("x86_64")
    ctl = state_dir() / "vagrant"
    before = set(ctl.glob("*")) if ctl.exists() else set()
    proc = cli.start(
        "probe", "ksys_write", "--pre", "--duration", "120", "--target", f"vagrant:{machine}", stdout=subprocess.DEVNULL
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        if "armed as" in line:
            break
        assert time.monotonic() < deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    look = "lsmod; ls -d /tmp/kbridge-vg-*; ps -eo args | grep '[a]gent '"
    after = cli.run("vm", "exec", "--target", f"vagrant:{machine}", "--", "sh", "-c", look)
    assert after.returncode == 0, after.stderr
    assert "cleaned up after a kbridge that was killed: module kb_" in after.stderr, after.stderr  # its probe
    assert "kb_ksys_write" not in after.stdout, after.stdout
    # Of kbridge's helpers only this exec's own agent and its directory are left.
    assert len(re.findall(r"^/tmp/kbridge-vg-\w+$", after.stdout, re.M)) == 1, after.stdout
    assert len(re.findall(r"agent serve", after.stdout)) == 1 and "agent copy" not in after.stdout, after.stdout
    assert set(ctl.glob("*")) == before  # no control socket or state directory left on the host


def test_vagrant_ssh_workload_under_a_duration(vagrant_env: LibvirtInNetns, machines: Callable[[str], str]) -> None:
    """The habit: arm with --duration, run your own workload from `vagrant ssh` meanwhile."""
    machine = machines("x86_64")
    probe = cli.start(
        "probe", "ksys_write", "--pre", "--comm", "dd", "--duration", "40", "--target", f"vagrant:{machine}", "--json"
    )
    assert probe.stderr is not None
    for line in probe.stderr:
        if "armed as" in line:
            break
    ssh = _vagrant("ssh", machine, "-c", DD.format(n=25), timeout=120)
    assert ssh.returncode == 0, ssh.stderr
    out, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1])["summary"]["mechanisms"]["kmod"]["hits"] == 25


def test_target_vagrant_picks_the_one_running_machine(
    vagrant_env: LibvirtInNetns, machines: Callable[[str], str]
) -> None:
    """The primary (x86_64) halted, arm64 running: `--target vagrant` is arm64."""
    machines("arm64")
    machines("x86_64")
    both = cli.run("vm", "exec", "--target", "vagrant", "--", "true")
    assert both.returncode == 2 and "several machines" in both.stderr and "vagrant:kbridge-arm64" in both.stderr
    halt = _vagrant("halt", MACHINES["x86_64"])
    assert halt.returncode == 0, halt.stderr
    s = summary(
        cli.run(
            "probe", "ksys_write", "--pre", "--comm", "dd", "--run", DD.format(n=7), "--target", "vagrant", "--json"
        )
    )
    assert s["target"] == "vagrant:kbridge-arm64" and s["arch"] == "arm64" and s["mechanisms"]["kmod"]["hits"] == 7
    halted = cli.run("vm", "exec", "--target", "vagrant:kbridge-x86_64", "--", "true")
    assert (
        halted.returncode == 2
        and "'kbridge-x86_64' is shut off" in halted.stderr
        and "vagrant up kbridge-x86_64" in halted.stderr
    )


def test_box_remove_takes_vagrants_box_and_libvirts_volume(
    vagrant_env: LibvirtInNetns, machines: Callable[[str], str]
) -> None:
    machine = machines("arm64")
    box = boxes.load(get_arch("arm64"))
    assert box is not None and box.version in vagrantboxes.added_boxes().get(box.name, [])
    assert box.version in vagrantboxes.box_volumes(box.name).values()  # `vagrant up` copied the disk into the pool
    refused = cli.run("box", "remove", "--arch", "arm64", "--keep-cache")
    assert refused.returncode == 2 and f"used by the Vagrant machine {machine!r}" in refused.stderr, refused.stderr
    assert box.version in vagrantboxes.added_boxes().get(box.name, [])  # nothing changed
    assert _vagrant("destroy", "-f", machine).returncode == 0
    gone = cli.run("box", "remove", "--arch", "arm64", "--keep-cache")
    assert gone.returncode == 0, gone.stderr
    assert box.name not in vagrantboxes.added_boxes() and not vagrantboxes.box_volumes(box.name)
    assert boxes.load(get_arch("arm64")) is not None  # --keep-cache: the build stays
    pruned = cli.run("box", "prune")
    assert pruned.returncode == 0, pruned.stderr
    current = boxes.load(get_arch("x86_64"))
    assert current is not None
    assert set(vagrantboxes.added_boxes().get(current.name, [])) <= {current.version}
    assert set(vagrantboxes.box_volumes(current.name).values()) <= {current.version}


# -- a box kbridge did not build ----------------------------------------------------------

FOREIGN = "debian12"


@pytest.fixture(scope="module")
def foreign_machine(
    vagrant_env: LibvirtInNetns, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[str], dict[str, str]]]:
    """A Debian 12 box made as public Debian boxes are (systemd, its kernel through apt, its own network
    configuration, no busybox, no kernel headers), added and up in a Vagrantfile of its own: the
    options that name it, and the environment of its Vagrant directory."""
    t0 = time.monotonic()
    box_file, name = build_debian_box(get_arch("x86_64"))
    TIMINGS["foreign box build/check"] = time.monotonic() - t0
    d = tmp_path_factory.mktemp("foreign")
    (d / "Vagrantfile").write_text(
        textwrap.dedent(
            f"""
            Vagrant.configure("2") do |config|
              config.vm.box = "{name}"
              config.vm.synced_folder ".", "/vagrant", disabled: true
              config.vm.define "{FOREIGN}" do |m|
                m.vm.provider :libvirt do |lv|
                  lv.driver = "qemu"
                  lv.cpu_mode = "custom"
                  lv.cpu_model = "qemu64"
                  lv.memory = 1024
                end
              end
            end
            """
        )
    )
    env = {**os.environ, "VAGRANT_CWD": str(d), "VAGRANT_DOTFILE_PATH": str(d / ".vagrant")}
    if name not in vagrantboxes.added_boxes():
        add = subprocess.run(["vagrant", "box", "add", "--name", name, str(box_file)], capture_output=True, text=True)
        assert add.returncode == 0, add.stderr
    remove_stale_domain(f"{d.name}_{FOREIGN}")
    with netns.entered(vagrant_env.name):
        t0 = time.monotonic()
        up = subprocess.run(["vagrant", "up", FOREIGN], capture_output=True, text=True, env=env, timeout=1500)
        TIMINGS["foreign vagrant up"] = time.monotonic() - t0
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-2000:]
        yield ["--target", f"vagrant:{FOREIGN}", "--vagrantfile", str(d)], env
    finally:
        with netns.entered(vagrant_env.name):
            subprocess.run(["vagrant", "destroy", "-f", FOREIGN], capture_output=True, env=env, timeout=600)


def _forget_builds(image: Image, specs: list[ProbeSpec], user_dirs: list[Path]) -> None:
    """kbuild's cache for these modules on IMAGE's kernel: gone, so the next command builds (and so
    needs the headers) again."""
    for spec in specs:
        mod = render(spec, image.arch, image.krel)
        files = {k: v.encode() for k, v in mod.files.items()}
        shutil.rmtree(cache_dir() / "kbuild" / kbuild.cache_key(files, image), ignore_errors=True)
    for d in user_dirs:
        shutil.rmtree(cache_dir() / "kbuild" / kbuild.cache_key(kbuild.source_files(d), image), ignore_errors=True)


# ~5 minutes (its box built with mmdebstrap on a fresh cache, a systemd boot, Debian's headers fetched):
# outside the default run, with `-m matrix`.
@pytest.mark.matrix
def test_a_box_kbridge_did_not_build(
    vagrant_env: LibvirtInNetns, foreign_machine: tuple[list[str], dict[str, str]], tmp_path: Path
) -> None:
    """vm exec, push/pull, tracefs and inspect need no headers; modules get them from Debian's archive
    or the machine itself (else one line says how to install them); bpf needs nothing in the box."""
    vf, env = foreign_machine

    def fk(*args: str) -> subprocess.CompletedProcess[str]:
        """kbridge ARGS on the machine (its options before a `--`, which ends `vm exec`'s)."""
        cut = args.index("--") if "--" in args else len(args)
        return cli.run(*args[:cut], *vf, *args[cut:], env=env)

    look = (
        "uname -r; cat /proc/1/comm; "
        "for f in /lib/modules/$(uname -r)/build /bin/busybox /etc/kbridge; do [ -e $f ] && echo $f; done; true"
    )
    facts = fk("vm", "exec", "--", "sh", "-c", look)
    assert facts.returncode == 0, facts.stderr
    krel, init, *found = facts.stdout.split()
    assert init == "systemd" and found == [], facts.stdout  # systemd; no headers, no busybox, nothing of kbridge's
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        machine = connect(FOREIGN)
        image, guest_kernel = machine.image, machine.guest_kernel()
        machine.release()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert image.dir.parent == cache_dir() / "foreign" and image.krel == krel  # its own kernel, not kbridge's
    arch = get_arch("x86_64")
    counted = make_spec("ksys_write", {"pre"}, [], arch, comm="dd")
    by_guest = make_spec("ksys_write", {"pre"}, ["count=3"], arch, comm="dd")
    shutil.rmtree(foreign.kernel_dir(guest_kernel) / "headers", ignore_errors=True)
    _forget_builds(image, [counted, by_guest], [REPO / "examples/chardev"])

    # Commands and files: nothing of kbridge's needed in the box (its busybox is pushed to /tmp).
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(300_000))
    assert fk("vm", "push", str(src), "/tmp/in.bin").returncode == 0
    pulled = fk("vm", "pull", "/tmp/in.bin", str(tmp_path / "out.bin"))
    assert pulled.returncode == 0 and (tmp_path / "out.bin").read_bytes() == src.read_bytes(), pulled.stderr

    # tracefs and inspect: no headers, and none fetched for them.
    s = summary(fk("trace", "p:kbw ksys_write", "--comm", "dd", "--run", DD.format(n=12), "--json"))
    assert s["mechanisms"]["tracefs"]["counters"] == {"kprobes/kbw": 12}, s
    ins = fk("inspect", "ksys_write", "--json")
    assert ins.returncode == 0, ins.stderr[-2000:]
    data = json.loads(ins.stdout)
    assert data["mode"] == "ftrace" and data["insn"]["armed"].startswith("e8"), data  # the ftrace call, from kcore
    assert data["insn"]["after"] == data["insn"]["before"] != data["insn"]["armed"]
    brk = json.loads(fk("inspect", "ksys_write", "--breakpoint", "--json").stdout)
    assert brk["mode"] == "breakpoint" and brk["insn"]["armed"].startswith("cc") and brk["offset"] == 5, brk
    assert not (foreign.kernel_dir(guest_kernel) / "headers").exists()

    # bpf: nothing to install in the box; kbridge's loader is pushed, the probe object is CO-RE.
    s = summary(fk("probe", "ksys_write", "--pre", "--via", "bpf", "--comm", "dd", "--run", DD.format(n=5), "--json"))
    assert s["mechanisms"]["bpf"]["counters"]["pre"] == 5, s

    # Not Debian as far as kbridge can tell, no headers in the box: one line saying how to install them.
    hide = "mv /etc/os-release /etc/os-release.kb; printf 'ID=other\\n' > /etc/os-release"
    assert fk("vm", "exec", "--", "sh", "-c", hide).returncode == 0
    try:
        refused = fk("probe", "ksys_write", "--pre", "--comm", "dd", "--run", DD.format(n=3))
        text = " ".join(refused.stderr.split())
        assert refused.returncode == 2 and f"no kernel headers for {krel}" in text, refused.stderr
        # No package name kbridge could know: the user's own package manager, and what it must provide.
        assert f"vagrant ssh {FOREIGN}" in text and "/lib/modules/$(uname -r)/build" in text, text
        assert "apt-get" not in text, text
    finally:
        fk("vm", "exec", "--", "mv", "-f", "/etc/os-release.kb", "/etc/os-release")

    # kmod: the headers of its kernel from Debian's archive; the count is the embedded VM's.
    t0 = time.monotonic()
    got = fk("probe", "ksys_write", "--pre", "--comm", "dd", "--run", DD.format(n=100), "--json")
    TIMINGS["foreign first kmod probe (headers fetched)"] = time.monotonic() - t0
    s = summary(got)
    assert s["mechanisms"]["kmod"]["hits"] == 100 and s["kernel"] == krel
    assert f"downloading linux-headers-{krel}" in got.stderr
    # The user's own module, built against those headers.
    load = fk("module", "load", str(REPO / "examples/chardev"))
    assert load.returncode == 0, load.stderr[-2000:]
    s = summary(fk("probe", "kbchardev_write", "--ret", "--run", "echo hi > /dev/kbchardev", "--json"))
    assert s["mechanisms"]["kmod"]["hits"] == 1
    assert fk("module", "unload", "kbchardev").returncode == 0

    # The box's own headers (Debian's packages, installed in it as apt would): copied out, used first.
    apt = PrivateApt(cache_dir() / "apt" / "bookworm-amd64", "bookworm", "amd64", host_mirrors("bookworm"))
    deps = apt.depends(f"linux-headers-{krel}")
    pkgs = [f"linux-headers-{krel}", *(p for p in deps if p.startswith(("linux-headers-", "linux-kbuild-")))]
    for deb in apt.download(pkgs, tmp_path / "debs"):
        assert fk("vm", "push", str(deb), f"/tmp/{deb.name}").returncode == 0
    install = "dpkg -i --force-depends /tmp/*.deb >/dev/null && test -f /lib/modules/$(uname -r)/build/Makefile"
    assert fk("vm", "exec", "--timeout", "600", "--", "sh", "-c", install).returncode == 0
    shutil.rmtree(foreign.kernel_dir(guest_kernel) / "headers")
    got = fk("probe", "ksys_write", "--pre", "--arg", "count=3", "--comm", "dd", "--run", DD.format(n=10), "--json")
    assert summary(got)["mechanisms"]["kmod"]["hits"] == 10
    assert f"copying the kernel headers of vagrant:{FOREIGN} ({krel}) to the host" in got.stderr, got.stderr
    assert "downloading linux-headers" not in got.stderr
