"""VM tests boot real guests through kbridge's own pytest plugin (fixtures kbridge_vm, kbridge_session).

This suite runs with --kbridge-bcc (pyproject's addopts): the kept VMs boot the image with bcc, so the
three-ways lab (bcc written by hand) shares one VM per arch and kernel with every mechanism's tests.
"""

from collections.abc import Iterator

import pytest

from kbridge.api import Guest
from kbridge.session import Session


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture
def bcc_kept(kbridge_vm: Guest) -> Guest:
    """The kept VM, which has bcc (eBPF tests)."""
    if kbridge_vm.arch_info.bcc_refusal:
        pytest.skip(kbridge_vm.arch_info.bcc_refusal)
    if kbridge_vm.flavour != "bcc":
        pytest.skip("the kept VM has no bcc: run with --kbridge-bcc")
    return kbridge_vm


@pytest.fixture
def session(kbridge_vm: Guest) -> Iterator[Session]:
    """A Session on the kept VM (eBPF and compare tests)."""
    with kbridge_vm.session() as s:
        yield s
