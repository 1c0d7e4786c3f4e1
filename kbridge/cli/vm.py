"""`kbridge vm up|status|exec|down`: a kept VM that later commands reuse (no boot per probe)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from kbridge.arch import ARCHES, get_arch
from kbridge.cli import app
from kbridge.cli.output import command, emit_json, err, out
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.targets.qemu import QemuVM, orphans

vm_app = typer.Typer(help="A kept guest VM, reused by later commands.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")

ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="x86_64 or arm64 (default: the host's).")]


@vm_app.command("up")
@command
def up(arch: ArchOpt = None,
       memory: Annotated[int, typer.Option("--memory", help="Guest memory in MiB.")] = 1024,
       cpus: Annotated[int, typer.Option("--cpus", help="Guest CPUs.")] = 1,
       json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Boot a VM and keep it running for later commands."""
    a = get_arch(arch)
    vm = QemuVM.attach(a)
    if vm is None:
        vm = QemuVM.boot(images.ensure(a), keep=True, memory_mb=memory, cpus=cpus)
    else:
        err.print(f"[cyan]• a {a.name} VM is already up[/]")
    info = _info(vm)
    vm.detach()
    emit_json(info) if json_out else err.print(f"[green]✓ {a.name} VM up: {info['kernel']} ({info['accel']}), pid {info['pid']}[/]")


def _info(vm: QemuVM) -> dict:
    return {"arch": vm.arch.name, "kernel": vm.krel, "accel": vm.accel, "pid": vm.proc.pid,
            "dir": str(vm.rundir), "image": str(vm.image.dir)}


@vm_app.command("status")
@command
def status(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the kept VMs and any stray kbridge QEMU processes."""
    vms = []
    for a in ARCHES.values():
        vm = QemuVM.attach(a)
        if vm:
            vms.append(_info(vm))
            vm.detach()
    kept = {v["pid"] for v in vms}
    strays = [p.pid for p in orphans() if p.pid not in kept]
    if json_out:
        emit_json({"vms": vms, "stray_qemu_pids": strays})
        return
    if not vms:
        err.print("no kept VM is running (kbridge vm up starts one)")
    for v in vms:
        out.print(f"{v['arch']:7} {v['kernel']:18} {v['accel']:4} pid {v['pid']}")
    if strays:
        err.print(f"[yellow]! QEMU processes from kbridge without an owner: {strays} (kbridge vm down removes them)[/]")


@vm_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@command
def exec_(ctx: typer.Context, arch: ArchOpt = None,
          timeout: Annotated[float, typer.Option("--timeout")] = 120.0) -> None:
    """Run a command in the kept VM: kbridge vm exec -- CMD ARGS..."""
    argv = list(ctx.args)
    if not argv:
        raise KbridgeError("no command given", "kbridge vm exec -- uname -a")
    vm = QemuVM.attach(get_arch(arch))
    if vm is None:
        raise KbridgeError(f"no {get_arch(arch).name} VM is up", "start one with kbridge vm up")
    try:
        res = vm.run(argv, timeout=timeout)
    finally:
        vm.detach()
    sys.stdout.buffer.write(res.stdout)
    sys.stderr.buffer.write(res.stderr)
    raise typer.Exit(res.exitcode if res.signal is None else 128 + res.signal)


@vm_app.command("down")
@command
def down(arch: ArchOpt = None,
         all_: Annotated[bool, typer.Option("--all", help="Every kept VM and stray kbridge QEMU.")] = False) -> None:
    """Stop the kept VM (and with --all, every kbridge QEMU process)."""
    arches = list(ARCHES.values()) if all_ or arch is None else [get_arch(arch)]
    stopped = 0
    for a in arches:
        vm = QemuVM.attach(a)
        if vm:
            vm.shutdown()
            stopped += 1
            err.print(f"[green]✓ {a.name} VM stopped[/]")
    if all_:
        for p in orphans():
            p.kill()
            stopped += 1
    if not stopped:
        err.print("no kept VM was running")
