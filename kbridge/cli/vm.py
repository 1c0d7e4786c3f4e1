"""`kbridge vm up|status|exec|down`: a kept VM that later commands reuse (no boot per probe)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.markup import escape

from kbridge import kernels, targets
from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.options import (
    GUEST_OPTIONS,
    ArchOpt,
    JsonOpt,
    KernelOpt,
    KernelTreeOpt,
    TargetOpt,
    VagrantfileOpt,
    chosen,
    use_vagrantfile,
    with_options,
)
from kbridge.cli.output import command, emit_json, err, out
from kbridge.errors import KbridgeError
from kbridge.targets import ownership
from kbridge.targets.base import Target

vm_app = typer.Typer(help="A kept guest VM, reused by later commands.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")


@vm_app.command("up")
@command
def up(
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    kernel_tree: KernelTreeOpt = None,
    bcc: Annotated[bool, typer.Option("--bcc", help="Boot the image with bcc (for --via bpf).")] = False,
    memory: Annotated[int, typer.Option("--memory", min=256, max=65536, help="Guest memory in MiB.")] = 1024,
    cpus: Annotated[int, typer.Option("--cpus", min=1, max=64, help="Guest CPUs.")] = 1,
    gdb: Annotated[
        bool,
        typer.Option("--gdb", help="Start QEMU's gdb stub on a Unix socket (for kbridge gdb); boots with nokaslr."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Boot a VM and keep it running for later commands (one per arch and kernel)."""
    a = get_arch(arch)
    suite = kernels.resolve(kernel, kernel_tree)
    vm = targets.kept(a, suite)
    if vm is not None and gdb and targets.gdb_socket(vm) is None:
        vm.release()
        raise KbridgeError(
            f"the {a.name} {kernels.label(suite)} VM is up without the gdb stub",
            f"kbridge vm down --arch {a.name}, then {kernels.up_hint(a.name, suite)} --gdb",
        )
    if vm is None:
        vm = targets.boot(a, suite, "bcc" if bcc else "default", keep=True, memory_mb=memory, cpus=cpus, gdb=gdb)
    else:
        err.print(f"[cyan]• a {a.name} {escape(kernels.label(suite))} VM is already up[/]")
    info = vm.describe()
    vm.release()
    if json_out:
        emit_json(info)
    else:
        err.print(
            f"[green]✓ {a.name} VM up: {info['kernel']} ({info['accel']}, {info['flavour']}), pid {info['pid']}[/]"
        )
        if info.get("gdb"):
            err.print(f"[dim]  gdb stub: {escape(info['gdb'])} (kbridge gdb --arch {a.name} attaches to it)[/]")


@vm_app.command("status")
@command
def status(json_out: JsonOpt = False) -> None:
    """Show the kept VMs and any stray kbridge QEMU processes."""
    vms = []
    for vm in targets.kept_vms():
        vms.append(vm.describe())
        vm.release()
    strays = targets.strays()
    if json_out:
        emit_json({"vms": vms, "stray_qemu_pids": strays})
        return
    if not vms:
        err.print("no kept VM is running (kbridge vm up starts one)")
    for v in vms:
        suite = v["suite"] if not v["suite"].startswith(kernels.TREE) else "tree"
        gdb = "  gdb stub" if v.get("gdb") else ""
        out.print(f"{v['arch']:7} {suite:9} {v['kernel']:22} {v['accel']:4} {v['flavour']:8} pid {v['pid']}{gdb}")
        if v.get("user_modules"):
            err.print(f"  your modules loaded: {', '.join(v['user_modules'])}")
        if v.get("crashed"):
            report = f": {v['crash_report']}" if v.get("crash_report") else ""
            err.print(
                f"[yellow]  its kernel crashed{escape(report)}; the next command that needs it restarts it "
                "(kbridge vm down stops it now)[/]"
            )
    if strays:
        err.print(
            f"[yellow]! QEMU processes from kbridge without an owner: {strays} (kbridge vm down --all removes them)[/]"
        )


@vm_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@command
def exec_(
    ctx: typer.Context,
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    kernel_tree: KernelTreeOpt = None,
    target: TargetOpt = None,
    vagrantfile: VagrantfileOpt = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the command (then it is reported).")
    ] = 120.0,
) -> None:
    """Run a command in the kept VM (or a Vagrant machine): kbridge vm exec -- CMD ARGS..."""
    use_vagrantfile(vagrantfile)
    argv = list(ctx.args)
    if not argv:
        raise KbridgeError("no command given", "kbridge vm exec -- uname -a")
    guest = _running(arch, kernels.resolve(kernel, kernel_tree), target)
    try:
        with targets.watch(guest):  # an oops the command causes is shown and saved, and fails it
            res = guest.run(argv, timeout=timeout)
            sys.stdout.buffer.write(res.stdout)
            sys.stderr.buffer.write(res.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        guest.release()
    raise typer.Exit(res.exitcode if res.signal is None else 128 + res.signal)


def _move(way: str, src: str, dst: str, **opts: str | None) -> tuple[str, str]:
    """A file moved into (push) or out of (pull) the kept VM OPTS choose: where it landed, and the guest's arch."""
    from pathlib import Path

    from kbridge.targets import files

    g = chosen(**opts)
    vm = _running(g.arch, g.key, g.target)
    try:
        where = files.push(vm, Path(src), dst) if way == "push" else files.pull(vm, src, Path(dst))
    finally:
        vm.release()
    return str(where), vm.arch.name


def _running(arch: str | None, key: str, target: str | None) -> Target:
    """A guest that is already up: the kept VM of ARCH and kernel KEY, or the Vagrant machine.

    What a killed kbridge left in it is reclaimed first, as every command does.
    """
    guest = targets.running(get_arch(arch) if arch else None, key, target)
    try:
        if done := ownership.reclaim(guest):
            err.print(f"[yellow]! {guest.name}: cleaned up after a kbridge that was killed: {', '.join(done)}[/]")
    except BaseException:
        guest.release()
        raise
    return guest


@vm_app.command("down")
@command
def down(
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    kernel_tree: KernelTreeOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every kept VM and stray kbridge QEMU.")] = False,
) -> None:
    """Stop the kept VM (with --all: every kept VM and every QEMU left by a killed kbridge)."""
    stopped = 0
    suite = kernels.resolve(kernel, kernel_tree)
    for vm in targets.kept_vms():
        chosen = kernel is None and kernel_tree is None
        if all_ or ((arch is None or vm.arch == get_arch(arch)) and (chosen or vm.image.key == suite)):
            name = f"{vm.arch.name} {kernels.label(vm.image.key)}"
            targets.shutdown(vm)
            stopped += 1
            err.print(f"[green]✓ {name} VM stopped[/]")
        else:
            vm.release()
    if all_:
        stopped += targets.kill_strays()
    if not stopped:
        err.print("no kept VM was running")


@vm_app.command("push")
@command
@with_options(GUEST_OPTIONS)
def push(
    src: Annotated[str, typer.Argument(help="A local file (e.g. your static test program).", show_default=False)],
    dst: Annotated[
        str,
        typer.Argument(help="Where in the guest: an absolute path, or a directory ending in /.", show_default=False),
    ],
    **opts: Any,
) -> None:
    """Copy a file into the kept VM (its mode kept): kbridge vm push ./client /tmp/client"""
    where, guest = _move("push", src, dst, **opts)
    err.print(f"[green]✓ {src} -> {where} in the {guest} guest[/]")


@vm_app.command("pull")
@command
@with_options(GUEST_OPTIONS)
def pull(
    src: Annotated[str, typer.Argument(help="A file in the guest (absolute path).", show_default=False)],
    dst: Annotated[str, typer.Argument(help="A local file or directory.", show_default=False)],
    **opts: Any,
) -> None:
    """Copy a file out of the kept VM: kbridge vm pull /tmp/out.log ."""
    where, guest = _move("pull", src, dst, **opts)
    err.print(f"[green]✓ {src} in the {guest} guest -> {where}[/]")
