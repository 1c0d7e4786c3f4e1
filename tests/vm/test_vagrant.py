"""Vagrant as a kbridge target: a real `vagrant up` of a locally built box, on x86_64 and arm64 (TCG).

libvirtd, its management network and the guests live in a network namespace the
test creates and removes (tests/vagrant/libvirt_netns.py); vagrant and ssh run in
it too. Per arch: build (or reuse) the box, `vagrant box add`, `vagrant up`, then
through `--target vagrant:...` a kmod probe whose count must equal the embedded
VM's for the same workload, a tracefs event, inspect, a clean guest afterwards,
and `vagrant destroy`. The host namespace's addresses must be unchanged.

Needs root and the packages in tests/vagrant/libvirt_netns.APT_PACKAGES (the
README's test command installs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbridge import netns
from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.images import box as boxes
from kbridge.inspect import inspect
from kbridge.mechanisms import tracefs
from kbridge.mechanisms.engine import StopRule
from kbridge.paths import cache_dir
from kbridge.probe import probe
from kbridge.session import Session
from kbridge.spec import make_spec
from kbridge.targets import acquire
from kbridge.targets.vagrant import connect
from kbridge.workload import Workload

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vagrant"))
from libvirt_netns import (
    APT_PACKAGES,
    LIBVIRT_SOCK,
    LibvirtInNetns,
    _answers,
    apt_install,
    missing_tools,
    prune_box_volumes,
    remove_stale_domain,
    virsh,
)

# One libvirtd at a time (its socket path is fixed): both arches on one xdist worker.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vagrant")]
REPO = Path(__file__).resolve().parents[2]
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
            # No version checks against the internet.
            "VAGRANT_CHECKPOINT_DISABLE": "1",
            "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
        }
    )
    env.start()
    try:
        yield env
    finally:
        env.stop()
        os.environ.clear()
        os.environ.update(saved)
        after = _host_addresses()
        assert after == before, f"the host namespace changed:\nbefore:\n{before}\nafter:\n{after}"
        if TIMINGS:
            print("\nvagrant timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(TIMINGS.items())))


def _vagrant(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["vagrant", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("arch_name", ["x86_64", "arm64"])
def test_vagrant_target(vagrant_env: LibvirtInNetns, arch_name: str) -> None:
    arch = get_arch(arch_name)
    machine = f"kbridge-{arch_name}"
    t0 = time.monotonic()
    box = boxes.ensure(arch)
    TIMINGS[f"{arch_name} box build/check"] = time.monotonic() - t0
    t0 = time.monotonic()
    boxes.vagrant_add(box)
    TIMINGS[f"{arch_name} box add"] = time.monotonic() - t0
    prune_box_volumes({box.version.replace(".", "_"), box.version})
    remove_stale_domain(f"{REPO.name}_{machine}")  # vagrant-libvirt's domain name: <dir>_<machine>

    with netns.entered(vagrant_env.name):
        # Before `vagrant up`: the machine exists only in the Vagrantfile.
        with pytest.raises(KbridgeError) as err:
            connect(machine)
        assert f"vagrant up {machine}" in str(err.value) and "not created" in err.value.message

        t0 = time.monotonic()
        up = _vagrant("up", machine)
        TIMINGS[f"{arch_name} vagrant up"] = time.monotonic() - t0
        try:
            assert up.returncode == 0, f"vagrant up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
            _exercise(arch_name, machine, box.krel)
        finally:
            down = _vagrant("destroy", "-f", machine)
            assert down.returncode == 0, down.stderr
    assert not [n for n in virsh("list", "--all", "--name").stdout.split() if machine in n]


def _exercise(arch_name: str, machine: str, krel: str) -> None:
    arch = get_arch(arch_name)
    target = f"vagrant:{machine}"
    count = 100
    spec = make_spec("ksys_write", {"pre"}, [], arch, comm="dd")

    # kmod through the same path as `kbridge probe --target vagrant:...`.
    t0 = time.monotonic()
    run = probe(spec, arch, Workload.shell(DD.format(n=count)), target=target)
    TIMINGS[f"{arch_name} probe round trip (connect + kmod)"] = time.monotonic() - t0
    assert run.target == target and run.kernel == krel
    assert run.result.counters["pre"] == count, run.summary()
    assert len(run.hits) == count and all(h.comm == "dd" for h in run.hits)

    with acquire(arch, target=target) as guest:
        assert guest.name == target and guest.kept and guest.arch.name == arch_name and guest.krel == krel
        session = Session(guest)

        t0 = time.monotonic()
        again = probe_on_session(session, spec, 7)
        TIMINGS[f"{arch_name} probe round trip (connected)"] = time.monotonic() - t0
        assert again == 7

        traced = tracefs.run_lines(
            session, ["p:kbvg/kbw ksys_write"], Workload.shell(DD.format(n=5)), StopRule(), comm="dd"
        )
        assert traced.counters == {"kbvg/kbw": 5}, traced.summary()
        assert len(traced.hits) == 5  # streamed back through the stream link on the SSH channel

        ins = inspect(session, "ksys_write")
        assert ins.kernel == krel and ins.hits >= 0
        if arch_name == "arm64":
            assert ins.insn["armed"].startswith(arch.breakpoint_insn.hex()), ins.to_json()  # BRK #4
        assert ins.insn.get("after") == ins.insn.get("before")

        # Nothing of kbridge's left in the guest.
        assert not [m for m in session.loaded_modules() if m.startswith("kb")]
        assert guest.read_file("/sys/kernel/tracing/kprobe_events").strip() == b""
        assert session.kprobes_list().strip() == ""

    # The README's command as a user types it, with no --arch: the arch comes from the machine.
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "kbridge",
            "probe",
            "sys_write",
            "--pre",
            "--comm",
            "dd",
            "--run",
            DD.format(n=3),
            "--target",
            target,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    summary = json.loads(cli.stdout.splitlines()[-1])["summary"]
    assert summary["arch"] == arch_name and summary["target"] == target, summary
    assert summary["mechanisms"]["kmod"]["hits"] == 3, summary

    # The embedded VM counts the same workload the same way.
    embedded = probe(spec, arch, Workload.shell(DD.format(n=count)))
    assert embedded.result.counters["pre"] == run.result.counters["pre"] == count


def probe_on_session(session: Session, spec, n: int) -> int:  # type: ignore[no-untyped-def]
    from kbridge.probe import probe_on

    return probe_on(session, spec, workload=Workload.shell(DD.format(n=n))).result.counters["pre"]
