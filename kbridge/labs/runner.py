"""Grade lab directories in a guest: one Target reused for a batch, restarted after a crash."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kbridge import kernels, progress, sandbox
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.labs import Lab, labdir
from kbridge.labs.context import LabContext
from kbridge.labs.diagnose import diagnose
from kbridge.labs.grading import Grader, Report, StepTimeout, StudentCrash
from kbridge.labs.guest import LogWatch, cleanup_guest_dir, install_workload
from kbridge.session import Session
from kbridge.targets.base import GuestCrash, GuestIOError, Target

CRASHED = "not run: the guest kernel crashed or hung (the VM is restarted for the next check)"
TIMED_OUT = "not run: an earlier step did not finish"
CRASH_HINT = (
    "your code crashed (or hung) the kernel at the place shown: in the kernel there is no "
    "segfault that only kills your program; fix it, then check again in the restarted VM"
)
TIMEOUT_HINT = "every step must finish by itself: look for a command that waits for input or for events"


def check_in(target: Target, directory: Path, lab: Lab, files: dict[str, str]) -> Report:
    """Grade one lab directory in TARGET. Student code that oopses or hangs the guest fails the
    check it was in, with the kernel's text; TARGET is then marked crashed (restarted on next use).
    A step that does not finish in a guest that still answers fails its check; the guest is kept."""
    report = Report(lab.name, str(directory), target.arch.name, target.krel)
    grader = Grader(list(lab.checker.CHECKS), report)
    t0 = time.monotonic()
    reason = "not run: a check it needs failed"
    with tempfile.TemporaryDirectory(prefix="kblab-") as tmp:
        ctx = LabContext(target, Session(target), directory, files, Path(tmp))
        try:
            try:
                install_workload(target)
                ctx.log = LogWatch(target)
                lab.checker.run(ctx, grader)
            except GuestCrash as e:  # seen by the target itself (a channel broke, the console shows it)
                raise StudentCrash(e.message, e.text) from None
            except GuestIOError:  # the agent stopped answering: a hung guest, or a broken one
                target.check_alive()  # GuestCrash if the console shows an oops or QEMU is gone
                raise StudentCrash("the guest kernel stopped answering: it hung", target.console_tail(40)) from None
        except GuestCrash as e:
            reason = _crashed(target, grader, lab, ctx, report, StudentCrash(e.message, e.text))
        except StudentCrash as crash:
            reason = _crashed(target, grader, lab, ctx, report, crash)
        except StepTimeout as e:
            reason = TIMED_OUT
            if e.stuck:
                ctx.restart = True
            if (current := _current(grader, lab)) is not None:
                grader.fail(current, e.message, e.hint or TIMEOUT_HINT)
        finally:
            if ctx.restart and not report.vm_restarted:  # left unsafe without an oops (a dangling kprobe)
                report.vm_restarted = True
                target.mark_crashed()
            if not report.vm_restarted:
                for fn in reversed(ctx.cleanups):
                    with contextlib.suppress(Exception):
                        fn()
                with contextlib.suppress(Exception):
                    cleanup_guest_dir(target)
    grader.finish(reason)
    report.seconds = time.monotonic() - t0
    return report


def _current(grader: Grader, lab: Lab) -> str | None:
    """The check in progress: the first one not yet recorded."""
    return next((c.name for c in lab.checker.CHECKS if not grader.done(c.name)), None)


def _crashed(target: Target, grader: Grader, lab: Lab, ctx: LabContext, report: Report, crash: StudentCrash) -> str:
    """Fail the check in progress with the kernel's text (and what it means), and mark the guest for a restart."""
    report.crashed = report.vm_restarted = True
    target.mark_crashed()
    if (current := _current(grader, lab)) is not None:
        detail, hint = diagnose(crash, ctx)
        grader.fail(current, detail, hint or CRASH_HINT)
    return CRASHED


def kernel_available(lab: Lab, arch: Arch) -> str | None:
    """Why LAB cannot run on ARCH without building an image first (its kernel's image is not
    built here), or None."""
    if lab.kernel is None:
        return None
    suite = kernels.resolve(lab.kernel)
    from kbridge.images import image as images

    if images.load(arch, suite, verify=False) is None:
        return (
            f"needs the {lab.kernel} kernel ({suite}), whose {arch.name} image is not built here "
            f"(kbridge vm up --kernel {lab.kernel} --arch {arch.name} builds and boots it)"
        )
    return None


Acquire = Callable[..., contextlib.AbstractContextManager[Target]]


def check_dirs(
    directories: list[Path], arch: str | None, keep: bool = False, acquire: Acquire | None = None
) -> Iterator[Report]:
    """Grade each directory on ARCH, reusing one guest per kernel and image flavour; a guest the
    student crashed is released and a fresh one acquired for the next directory."""
    loaded = load_all(directories)  # all bad input is reported before any boot
    yield from check_loaded(loaded, arch, keep, acquire)


Loaded = tuple[Path, Lab, dict[str, str]]


def load_all(directories: list[Path]) -> list[Loaded]:
    """Every directory's lab and files; a KbridgeError for the first bad one, before anything runs.
    A submission is never built unsandboxed: without a sandbox, refused here."""
    loaded = [(d, *labdir.load(d)) for d in directories]
    if any(f.endswith(".c") for _, lab, _ in loaded for f in lab.files):
        sandbox.detect()
    return loaded


def check_loaded(
    loaded: Iterable[Loaded],
    arch: str | None,
    keep: bool = False,
    acquire: Acquire | None = None,
    reuse_kept: bool = True,
) -> Iterator[Report]:
    """check_dirs for directories already loaded, taken one at a time as the previous one is graded
    (LOADED may be fed while it runs). REUSE_KEPT False: fresh VMs only, even when a kept one runs."""
    if acquire is None:
        from kbridge.targets import acquire as default_acquire

        acquire = default_acquire
    a = get_arch(arch)
    with contextlib.ExitStack() as stack:
        current: tuple[str | None, str] | None = None
        target: Target | None = None
        for directory, lab, files in loaded:
            if a.name not in lab.arches:
                yield Report(lab.name, str(directory), a.name, skipped=f"{lab.name} runs on {', '.join(lab.arches)}")
                continue
            want = (lab.kernel, lab.flavour)
            if target is None or want != current:
                stack.close()
                target = None
                if why := kernel_available(lab, a):
                    progress.info(f"{lab.name} {why}: building it (once)")
                try:
                    target = stack.enter_context(
                        acquire(
                            arch=a,
                            flavour=lab.flavour,
                            keep=keep,
                            kernel=lab.kernel,
                            watched=False,
                            reuse_kept=reuse_kept,
                        )
                    )
                except KbridgeError as e:
                    if lab.kernel is None:
                        raise
                    # The lab's kernel cannot be had here: say so; the lab is not run, not faked.
                    progress.warn(f"{directory}: {lab.name} skipped: {e.message}")
                    yield Report(
                        lab.name,
                        str(directory),
                        a.name,
                        skipped=f"the {lab.kernel} kernel is not available: {e.message}",
                    )
                    continue
                current = want
            if lab.flavour == "bcc" and target.bcc_python() is None:
                yield Report(
                    lab.name,
                    str(directory),
                    a.name,
                    target.krel,
                    skipped="needs a guest with bcc, and the kept VM has none: stop it "
                    "(kbridge vm down) so the check boots the bcc image",
                )
                continue
            progress.info(f"checking {directory} ({lab.name}) on {target.name} {target.krel}")
            report = check_in(target, directory, lab, files)
            if report.vm_restarted:
                was_kept, flavour = target.kept, target.flavour
                stack.close()  # the crashed guest is released (an ephemeral one is stopped)
                target = None
                if was_kept:  # a kept VM is restarted now, as it was, so nothing broken is left running
                    with acquire(arch=a, flavour=flavour, keep=True, kernel=lab.kernel):
                        progress.info(f"restarted the kept {a.name} VM")
            yield report


def require_dirs(paths: list[str]) -> list[Path]:
    if not paths:
        raise KbridgeError("no lab directory given", "kbridge lab check DIR [DIR...]")
    return [Path(p) for p in paths]
