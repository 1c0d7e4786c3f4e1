"""kbridge compare on real guests: kmod, tracefs and bpf agree on a deterministic workload."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kbridge.arch import get_arch
from kbridge.compare import compare
from kbridge.images import bcc
from kbridge.session import Session
from kbridge.spec import make_spec
from kbridge.targets.qemu import QemuVM


pytestmark = pytest.mark.vm

DD = "dd if=/dev/zero of=/dev/null bs=1 count=300"


def bcc_vm(arch_name: str) -> Iterator[QemuVM]:
    """A kept VM of the bcc image for the module (replacing a kept VM without bcc)."""
    arch = get_arch(arch_name)
    vm = QemuVM.attach(arch)
    if vm is not None and "-bcc" not in (vm.rundir / "vm.json").read_text():
        vm.shutdown()
        vm = None
    booted = vm is None
    if vm is None:
        vm = QemuVM.boot(bcc.ensure(arch), keep=True)
    vm.detach()
    yield vm
    if booted and (again := QemuVM.attach(arch)) is not None:
        again.shutdown()


@pytest.fixture(scope="module")
def bcc_kept(kbridge_arch: str) -> Iterator[QemuVM]:
    yield from bcc_vm(kbridge_arch)


@pytest.fixture
def session(bcc_kept: QemuVM) -> Iterator[Session]:
    vm = QemuVM.attach(bcc_kept.arch)
    assert vm is not None
    try:
        yield Session(vm)
    finally:
        vm.detach()


def test_three_mechanisms_equal_counts(session: Session) -> None:
    spec = make_spec("ksys_write", {"pre"}, ["fd=1", "count=3"], session.arch, comm="dd")
    comp = compare(session, spec, DD, repeats=2)
    ran = {n: m for n, m in comp.mechanisms.items() if m.result is not None}
    assert set(ran) == {"kmod", "tracefs", "bpf"}, {n: m.skipped for n, m in comp.mechanisms.items()}
    totals = {n: m.result.total for n, m in ran.items()}
    # Each repetition: 300 one-byte writes by dd plus one write of its summary to stderr.
    assert set(totals.values()) == {2 * 301}, totals
    assert comp.equal_counts
    assert all(m.agree in ("reference", "yes") for m in ran.values())
    assert all(m.result.first_event_s is not None and m.overhead_ns is not None for m in ran.values())
    js = comp.summary()["mechanisms"]
    assert set(js) == {"kmod", "tracefs", "bpf"} and js["bpf"]["hits"] == 602


def test_kretprobe_return_values_agree(session: Session) -> None:
    spec = make_spec("vfs_read", {"ret"}, None, session.arch, comm="dd")
    comp = compare(session, spec, DD, repeats=1)
    ran = {n: m for n, m in comp.mechanisms.items() if m.result is not None}
    assert set(ran) == {"kmod", "tracefs", "bpf"}
    assert comp.equal_counts
    for m in ran.values():
        assert m.agree in ("reference", "yes"), (m.name, m.agree)
        assert sum(1 for h in m.result.hits if h.retval == 1) == 300
