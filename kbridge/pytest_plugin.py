"""pytest fixtures for VM-based integration tests (registered as the `kbridge` pytest plugin).

    def test_write_is_probed(kbridge_vm):
        run = kbridge_vm.probe("ksys_write", pre=True, args={"count": 3}, run="echo hi > /tmp/x")
        assert run.counts["pre"] >= 1

`kbridge_vm` is a kbridge.Guest (the object `kbridge.vm()` gives) on a VM kept
for the whole test session, one per arch and kernel, parametrised over
--kbridge-arch (default: x86_64 and arm64; arm too with the option) and --kbridge-kernel (default:
bookworm); with --kbridge-target vagrant:NAME it is that Vagrant machine (its own arch, unless
--kbridge-arch names it), on one SSH connection for the session.
A test marked `@pytest.mark.kbridge_arches("arm")` runs on those arches instead of the
default ones, and on those of them --kbridge-arch names when it is given.
`kbridge_session` gives a Session (symbols, guest commands) holding the VM for
one test.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Generator, Iterator

import pytest

from kbridge import kernels
from kbridge.api import Guest
from kbridge.arch import ARCHES, get_arch
from kbridge.paths import state_dir
from kbridge.session import Session
from kbridge.targets import parse_target
from kbridge.targets.base import GuestCrash

# The arches a kbridge_vm test runs on when neither --kbridge-arch nor a kbridge_arches marker
# says otherwise. 32-bit arm boots in every default run through the tests marked for it
# (tests/vm/test_arm.py); its whole suite is `--kbridge-arch arm`.
DEFAULT_ARCHES = ("x86_64", "arm64")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kbridge")
    group.addoption(
        "--kbridge-arch",
        action="append",
        default=None,
        help=f"guest arch for kbridge VM tests (repeatable; {', '.join(ARCHES)}; "
        f"default: {' and '.join(DEFAULT_ARCHES)})",
    )
    group.addoption(
        "--kbridge-kernel",
        action="append",
        default=None,
        help=f"guest kernel for kbridge VM tests (repeatable; {kernels.choices()}; default: bookworm)",
    )
    group.addoption(
        "--kbridge-kernel-tree",
        action="append",
        default=None,
        help="a kernel tree you built, as a guest kernel for kbridge VM tests (repeatable; with --kbridge-kernel too)",
    )
    group.addoption(
        "--kbridge-target", default=None, help="run kbridge VM tests on vagrant:MACHINE instead of the embedded QEMU VM"
    )
    group.addoption(
        "--kbridge-bcc",
        action="store_true",
        default=False,
        help="boot the kept VMs from the image with bcc, so via='bpf' works in every test",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a real guest VM through kbridge (slow; needs QEMU)")
    config.addinivalue_line(
        "markers", "kbridge_arches(*names): the arches this test runs on (instead of the default ones)"
    )
    # Under pytest-xdist each worker keeps VMs of its own: a kept VM serves one command at a time,
    # and a worker's session teardown must not stop a VM another worker is using.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and not os.environ.get("KBRIDGE_XDIST_STATE"):
        os.environ["KBRIDGE_STATE"] = os.environ["KBRIDGE_XDIST_STATE"] = str(state_dir() / worker)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups in its own hook
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of one arch and kernel go to one xdist worker (--dist loadgroup): one boot each."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "kbridge_arch" in params:
            group = f"{params['kbridge_arch']}-{params.get('kbridge_kernel', kernels.DEFAULT)}"
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kbridge_arch" in metafunc.fixturenames:
        given = [get_arch(a).name for a in metafunc.config.getoption("--kbridge-arch") or ()]
        if (marker := metafunc.definition.get_closest_marker("kbridge_arches")) is not None:
            own = [get_arch(a).name for a in marker.args]
            arches = [a for a in own if a in given] if given else own
        else:
            arches = given or [get_arch(a).name for a in _target_arches(metafunc.config)] or list(DEFAULT_ARCHES)
        metafunc.parametrize("kbridge_arch", arches, scope="session")
    if "kbridge_kernel" in metafunc.fixturenames:
        trees = metafunc.config.getoption("--kbridge-kernel-tree") or []
        wanted = metafunc.config.getoption("--kbridge-kernel") or ([] if trees else [kernels.DEFAULT])
        keys = [kernels.resolve(k) for k in wanted] + [kernels.resolve(None, t) for t in trees]
        metafunc.parametrize("kbridge_kernel", keys, ids=[_kernel_id(k) for k in keys], scope="session")


def _kernel_id(key: str) -> str:
    """A test id part for kernel KEY: a tree by its directory's name."""
    tree = kernels.tree_of(key)
    return f"tree-{tree.name}" if tree is not None else key


_ARCH_OF_TARGET = pytest.StashKey[list[str]]()


def _target_arches(config: pytest.Config) -> list[str]:
    """With --kbridge-target vagrant:NAME and no --kbridge-arch: that machine's arch only (asked once)."""
    target = config.getoption("--kbridge-target")
    if parse_target(target).kind == "qemu":
        return []
    if _ARCH_OF_TARGET not in config.stash:
        from kbridge.targets import machine_arch

        arch = machine_arch(target, connect=False)
        config.stash[_ARCH_OF_TARGET] = [arch.name] if arch else []
    return config.stash[_ARCH_OF_TARGET]


@pytest.fixture(scope="session")
def kbridge_kernel() -> str:
    """The guest kernel's key: a suite, "debug" or "tree:PATH" (parametrised by --kbridge-kernel and
    --kbridge-kernel-tree when a test asks for it)."""
    return kernels.DEFAULT


@pytest.fixture(scope="session")
def kbridge_vm(request: pytest.FixtureRequest, kbridge_arch: str, kbridge_kernel: str) -> Iterator[Guest]:
    """A Guest on a kept VM of kbridge_arch and kbridge_kernel, booted once per test session."""
    from kbridge import targets

    where = parse_target(request.config.getoption("--kbridge-target"))
    arch = get_arch(kbridge_arch)
    if where.kind != "qemu":
        # One SSH connection (and the machine's lock) for the whole session.
        with targets.acquire(arch, kernel=kbridge_kernel, target=where, watched=False) as t:
            yield Guest(t.arch, kbridge_kernel, where, held=t)
        return
    # bcc's root filesystem exists for Debian's kernels, on the arches bcc serves: the debug kernel,
    # a tree and 32-bit arm boot without it (tests that need bcc skip there).
    bcc = request.config.getoption("--kbridge-bcc") and kernels.is_debian(kbridge_kernel) and not arch.bcc_refusal
    flavour = "bcc" if bcc else "default"
    vm = targets.kept(arch, kbridge_kernel)
    if vm is not None and flavour == "bcc" and vm.flavour != "bcc":
        targets.shutdown(vm)  # a VM without bcc cannot serve via="bpf"
        vm = None
    booted = vm is None
    if vm is None:
        vm = targets.boot(arch, kbridge_kernel, flavour, keep=True)
    vm.release()  # each call attaches (and locks) it; nested library calls share that
    yield Guest(arch, kbridge_kernel, where)
    if booted and (again := targets.kept(arch, kbridge_kernel)) is not None:
        targets.shutdown(again)


_STARTED = pytest.StashKey[float]()
_GUEST = pytest.StashKey[Guest]()
LOG_LINES = 60  # of the guest kernel log attached to a failing test's report


@pytest.fixture(autouse=True)
def _kbridge_unload_user_modules(request: pytest.FixtureRequest) -> Iterator[None]:
    """Modules a test loads into kbridge_vm are unloaded after it, even when it fails."""
    if "kbridge_vm" not in request.fixturenames:
        yield
        return
    from kbridge import modules

    guest: Guest = request.getfixturevalue("kbridge_vm")
    request.node.stash[_GUEST] = guest
    request.node.stash[_STARTED] = time.monotonic()
    with guest.session() as s:
        before = set(s.loaded_modules())
    yield
    # A crash was the test's own failure, reported with it; a crashed guest is left as it is for
    # `kbridge vm status` and restarted by the next use (which names the modules it held).
    with contextlib.suppress(GuestCrash):
        if guest.crashed():
            return
        with guest.session() as s:
            modules.unload_since(s.target, before)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that used kbridge_vm gets the guest kernel's log of its duration in its report,
    and the crash report (and its file) when the guest crashed."""
    report = yield
    if call.when != "call" or not report.failed or _GUEST not in item.stash:
        return report
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, GuestCrash) and exc.crash is not None:
        where = f"\nthe whole report: {exc.crash.file}" if exc.crash.file else ""
        title = (
            "kbridge guest crash" if exc.crash.checker is None else f"kbridge guest kernel report ({exc.crash.checker})"
        )
        report.sections.append((title, exc.crash.head(frames=30) + where))
    with contextlib.suppress(Exception):  # a guest that cannot answer any more has said what it could
        lines = item.stash[_GUEST].kernel_log(since=item.stash[_STARTED]).splitlines()
        if len(lines) > LOG_LINES:  # the end is what led to the failure; the rest is in `kbridge vm exec -- dmesg`
            lines = [f"... {len(lines) - LOG_LINES} earlier lines left out", *lines[-LOG_LINES:]]
        report.sections.append(("kbridge guest kernel log (this test)", "\n".join(lines)))
    return report


@pytest.fixture
def kbridge_session(kbridge_vm: Guest) -> Iterator[Session]:
    """A Session on the kept VM, holding its lock for the test."""
    with kbridge_vm.session() as s:
        yield s
