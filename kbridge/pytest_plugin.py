"""pytest fixtures for VM-based integration tests (registered as the `kbridge` pytest plugin).

    def test_write_is_probed(kbridge_session):
        run = kbridge.probe.probe(make_spec("ksys_write", {"pre"}), kbridge_session.arch, ...)

`kbridge_arch` is parametrised over --kbridge-arch (repeatable; default: x86_64
and arm64), `kbridge_vm` is a kept VM per arch for the whole test session (one
boot each; reused by kbridge.probe.probe and friends), `kbridge_session` wraps it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kbridge.arch import ARCHES, get_arch
from kbridge.images import image as images
from kbridge.session import Session
from kbridge.targets.qemu import QemuVM


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kbridge")
    group.addoption("--kbridge-arch", action="append", default=None,
                    help="guest arch for kbridge VM tests (repeatable; default: x86_64 and arm64)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a real guest VM through kbridge (slow; needs QEMU)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kbridge_arch" in metafunc.fixturenames:
        arches = metafunc.config.getoption("--kbridge-arch") or list(ARCHES)
        metafunc.parametrize("kbridge_arch", [get_arch(a).name for a in arches], scope="session")


@pytest.fixture(scope="session")
def kbridge_vm(kbridge_arch: str) -> Iterator[QemuVM]:
    """A kept VM of kbridge_arch, booted once per test session and stopped after it."""
    arch = get_arch(kbridge_arch)
    vm = QemuVM.attach(arch)
    booted = vm is None
    if vm is None:
        vm = QemuVM.boot(images.ensure(arch), keep=True)
    vm.detach()  # each test attaches (and locks) it; nested library calls share that
    yield vm
    if booted:
        again = QemuVM.attach(arch)
        if again is not None:
            again.shutdown()


@pytest.fixture
def kbridge_session(kbridge_vm: QemuVM) -> Iterator[Session]:
    """A Session on the kept VM, holding its lock for the test."""
    vm = QemuVM.attach(kbridge_vm.arch)
    assert vm is not None, "the kept VM went away (crashed?)"
    try:
        yield Session(vm)
    finally:
        vm.detach()
