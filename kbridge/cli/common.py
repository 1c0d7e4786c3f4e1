"""What several commands do with their option values, without typer: the fast path (kbridge.cli.fast) runs them too."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kbridge import kernels
from kbridge.arch import Arch, get_arch
from kbridge.errors import KbridgeError
from kbridge.spec import ProbeSpec, make_spec
from kbridge.targets import parse_target
from kbridge.workload import Workload


def use_vagrantfile(vagrantfile: str | None) -> None:
    """--vagrantfile DIR: Vagrant (and so kbridge) reads the Vagrantfile there, as with VAGRANT_CWD=DIR."""
    if vagrantfile is None:
        return
    path = Path(vagrantfile).expanduser()
    if path.name == "Vagrantfile" and path.is_file():
        path = path.parent
    if not (path / "Vagrantfile").is_file():
        raise KbridgeError(
            f"invalid --vagrantfile {vagrantfile!r}: no Vagrantfile there",
            "give the directory you run `vagrant up` in (the one holding the Vagrantfile)",
        )
    os.environ["VAGRANT_CWD"] = str(path.resolve())


@dataclass(frozen=True)
class Chosen:
    """The guest a command's options choose: --arch (None: the host's, or a Vagrant machine's own),
    the kernel key (kbridge.kernels.resolve) and --target."""

    arch: str | None
    key: str
    target: str | None


def chosen(
    arch: str | None = None,
    kernel: str | None = None,
    kernel_tree: str | None = None,
    target: str | None = None,
    vagrantfile: str | None = None,
) -> Chosen:
    """The guest the options of GUEST_OPTIONS choose (--vagrantfile applies at once)."""
    use_vagrantfile(vagrantfile)
    return Chosen(arch, kernels.resolve(kernel, kernel_tree), target)


def guest_arch(arch: str | None, target: str | None) -> Arch:
    """--arch, else the arch of the --target machine (a Vagrant machine says what it is: the connection
    made to ask it is the one the command then uses), else the host's."""
    if arch is not None or parse_target(target).kind == "qemu":
        return get_arch(arch)
    from kbridge.targets import machine_arch

    return machine_arch(target) or get_arch(None)


def arch_or_machine(arch: str | None, target: str | None) -> Arch | None:
    """--arch if given; else the host's for the embedded VM, None for a Vagrant machine (its own)."""
    if arch is not None or parse_target(target).kind == "qemu":
        return get_arch(arch)
    return None


def handlers(pre: bool = False, post: bool = False, entry: bool = False, ret: bool = False) -> set[str]:
    """The handler set from the four handler flags."""
    return {h for h, on in (("pre", pre), ("post", post), ("entry", entry), ("ret", ret)) if on}


def spec_of(
    symbol: str,
    arch: Arch,
    pre: bool = False,
    post: bool = False,
    entry: bool = False,
    ret: bool = False,
    arg: list[str] | None = None,
    offset: int = 0,
    maxactive: int = 0,
    pid: int | None = None,
    tid: int | None = None,
    comm: str | None = None,
    fault: bool = False,
) -> ProbeSpec:
    """The ProbeSpec the options of a command that names a probe describe."""
    return make_spec(
        symbol, handlers(pre, post, entry, ret), arg, arch, offset, maxactive, pid, comm, fault=fault, tid=tid
    )


def workload(run: str | None) -> Workload | None:
    """The user's --run command as a guest workload (None: the symbol's default)."""
    if run is None:
        return None
    if not run.strip():
        raise KbridgeError("empty --run command", "e.g. --run 'echo hi > /tmp/x'")
    return Workload.shell(run)


def explain_removed(jprobe: bool) -> None:
    """jprobes no longer exist: say what replaced them instead of failing obscurely."""
    if jprobe:
        raise KbridgeError(
            "jprobes were removed in Linux 4.15 (commit 590c84593045); they mirrored the probed "
            "function's signature to read its arguments",
            "use --arg NAME=N to fetch the Nth argument from the registers at entry "
            "(e.g. --pre --arg fd=1), or --entry with a kretprobe",
        )


def explain_fault_removed(krel_version: tuple[int, int] | None = None) -> KbridgeError:
    """What --fault says on kernels without kprobe fault_handler (5.14+)."""
    on = f" (this kernel is {krel_version[0]}.{krel_version[1]})" if krel_version else ""
    return KbridgeError(
        f"kprobe fault_handler was removed in Linux 5.14 (commit ec6aba3d2be1){on}: no in-tree user "
        "handled faults in it; handlers that touch memory use the *_nofault accessors instead",
        "use --kernel 5.10 to see the fault handler fire on a kernel that still has it",
    )


F = TypeVar("F", bound=Callable[..., Any])


def with_options(*groups: dict[str, tuple[Any, Any]]) -> Callable[[F], F]:
    """Declare the options of GROUPS (name: (annotation, default)) on a command in place of its **opts,
    which receives them. typer reads the signature for a command's options, the fast path's tests for
    the parameters it may fill."""

    def declare(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)  # the command's own annotations as objects, as typer reads them
        params = list(sig.parameters.values())
        at = next(i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD)
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for group in groups
            for name, (annotation, default) in group.items()
        ]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[:at] + params[at + 1 :]]
        lead = next((i for i, p in enumerate(own) if p.default is not inspect.Parameter.empty), len(own))
        # After the command's arguments (those without a default), where --help lists them first.
        fn.__signature__ = sig.replace(parameters=own[:lead] + added + own[lead:])  # type: ignore[attr-defined]
        fn.__annotations__ = {**fn.__annotations__, **{p.name: p.annotation for p in added}}
        return fn

    return declare


def options_of(fn: Callable[..., Any], *skip: str) -> dict[str, tuple[Any, Any]]:
    """FN's parameters but SKIP as an option group for with_options()."""
    return {
        p.name: (p.annotation, p.default)
        for p in inspect.signature(fn, eval_str=True).parameters.values()
        if p.name not in skip
    }
