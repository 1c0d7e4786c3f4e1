"""VM tests boot real guests through kbridge's own pytest plugin (fixtures kbridge_vm, kbridge_session)."""

from collections.abc import Iterator

import pytest

from kbridge.arch import get_arch
from kbridge.images import bcc
from kbridge.session import Session
from kbridge.targets.qemu import QemuVM


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


def bcc_vm(arch_name: str) -> Iterator[QemuVM]:
    """A kept VM of the bcc image for the module (replacing a kept VM without bcc)."""
    arch = get_arch(arch_name)
    vm = QemuVM.attach(arch)
    if vm is not None and vm.flavour != "bcc":
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
    """A Session on the kept bcc VM (eBPF and compare tests)."""
    vm = QemuVM.attach(bcc_kept.arch)
    assert vm is not None
    try:
        yield Session(vm)
    finally:
        vm.detach()
