"""`kbridge bpf render|up|image`: the generated bcc program, and the bcc image flavour."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.output import command, emit_json, err, out
from kbridge.errors import KbridgeError
from kbridge.spec import make_spec
from kbridge.targets.qemu import QemuVM

bpf_app = typer.Typer(help="eBPF through bcc in the guest: render programs, build and boot the bcc image.",
                      no_args_is_help=True)
app.add_typer(bpf_app, name="bpf")

ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="x86_64 or arm64 (default: the host's).")]


@bpf_app.command("render")
@command
def render_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function (used as written: no guest is asked).")],
    pre: Annotated[bool, typer.Option("--pre")] = False,
    entry: Annotated[bool, typer.Option("--entry")] = False,
    ret: Annotated[bool, typer.Option("--ret")] = False,
    arg: Annotated[Optional[list[str]], typer.Option("--arg", help="NAME=N")] = None,
    offset: Annotated[int, typer.Option("--offset")] = 0,
    maxactive: Annotated[int, typer.Option("--maxactive")] = 0,
    pid: Annotated[Optional[int], typer.Option("--pid")] = None,
    comm: Annotated[Optional[str], typer.Option("--comm")] = None,
    arch: ArchOpt = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the BPF C program and the attach plan for SYMBOL; run nothing."""
    from kbridge.render.bcc import render

    a = get_arch(arch)
    handlers = {h for h, on in (("pre", pre), ("entry", entry), ("ret", ret)) if on}
    spec = make_spec(symbol, handlers, arg, a, offset, maxactive, pid, comm)
    prog = render(spec, a)
    if json_out:
        emit_json({"text": prog.text, "attach": prog.attach})
        return
    out.print("/* ==== BPF program (bcc) ==== */", style="dim")
    out.print(prog.text, markup=False, highlight=False, end="", soft_wrap=True)
    out.print("/* ==== attach plan ==== */", style="dim")
    out.print(json.dumps(prog.attach, indent=1), markup=False, highlight=False, soft_wrap=True)


@bpf_app.command("image")
@command
def image_cmd(arch: ArchOpt = None,
              rebuild: Annotated[bool, typer.Option("--rebuild")] = False) -> None:
    """Build (or check) the bcc image flavour: Debian python3-bpfcc + kernel headers on an ext4 disk."""
    from kbridge.images import bcc

    img = bcc.ensure(get_arch(arch), rebuild=rebuild)
    err.print(f"[green]✓ bcc image: {img.dir} ({img.krel})[/]")


@bpf_app.command("up")
@command
def up(arch: ArchOpt = None,
       memory: Annotated[int, typer.Option("--memory", help="Guest memory in MiB.")] = 1024) -> None:
    """Boot a kept VM from the bcc image; later --via bpf commands use it."""
    from kbridge.images import bcc

    a = get_arch(arch)
    vm = QemuVM.attach(a)
    if vm is not None:
        has = (vm.rundir / "vm.json").read_text()
        vm.detach()
        if "-bcc" in json.loads(has).get("image", ""):
            err.print(f"[cyan]• a {a.name} bcc VM is already up[/]")
            return
        raise KbridgeError(f"a {a.name} VM without bcc is already up",
                           f"stop it first: kbridge vm down --arch {a.name}")
    vm = QemuVM.boot(bcc.ensure(a), keep=True, memory_mb=memory)
    err.print(f"[green]✓ {a.name} bcc VM up: {vm.krel} ({vm.accel}), pid {vm.proc.pid}[/]")
    vm.detach()
