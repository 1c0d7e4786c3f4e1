"""`kbridge bpf render|up|image`: the generated bcc program, and the bcc image flavour."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kbridge import kernels
from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.options import (
    ArchOpt,
    ArgOpt,
    CommOpt,
    EntryOpt,
    KernelOpt,
    MaxactiveOpt,
    OffsetOpt,
    PidOpt,
    PostOpt,
    PreOpt,
    RetOpt,
    handlers,
)
from kbridge.cli.output import command, emit_json, err, out
from kbridge.errors import KbridgeError
from kbridge.spec import make_spec

bpf_app = typer.Typer(
    help="eBPF through bcc in the guest: render programs, build and boot the bcc image.", no_args_is_help=True
)
app.add_typer(bpf_app, name="bpf")


@bpf_app.command("render")
@command
def render_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function (used as written: no guest is asked).")],
    pre: PreOpt = False,
    post: PostOpt = False,
    entry: EntryOpt = False,
    ret: RetOpt = False,
    arg: ArgOpt = None,
    offset: OffsetOpt = 0,
    maxactive: MaxactiveOpt = 0,
    pid: PidOpt = None,
    comm: CommOpt = None,
    arch: ArchOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object: the program text and attach plan.")
    ] = False,
) -> None:
    """Print the BPF C program and the attach plan for SYMBOL; run nothing."""
    from kbridge.mechanisms.bpf.render import render

    a = get_arch(arch)
    spec = make_spec(symbol, handlers(pre, post, entry, ret), arg, a, offset, maxactive, pid, comm)
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
def image_cmd(
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build it again from the packages.")] = False,
) -> None:
    """Build (or check) the bcc image flavour: Debian python3-bpfcc + kernel headers on an ext4 disk."""
    from kbridge.images import bcc

    suite = kernels.resolve(kernel)
    if not kernels.is_debian(suite):
        raise KbridgeError(
            f"the bcc image is built for Debian's kernels, not {kernels.label(suite)}",
            "choose a Debian kernel (--kernel 6.1); --via kmod and --via tracefs work on every kernel",
        )
    img = bcc.ensure(get_arch(arch), suite, rebuild=rebuild)
    err.print(f"[green]✓ bcc image: {img.dir} ({img.krel})[/]")


@bpf_app.command("up")
@command
def up(
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    memory: Annotated[int, typer.Option("--memory", min=256, max=65536, help="Guest memory in MiB.")] = 1024,
) -> None:
    """Boot a kept VM from the bcc image; later --via bpf commands use it (kbridge vm up --bcc does the same)."""
    from kbridge import targets

    a = get_arch(arch)
    suite = kernels.resolve(kernel)
    vm = targets.kept(a, suite)
    if vm is not None:
        flavour = vm.flavour
        vm.release()
        if flavour == "bcc":
            err.print(f"[cyan]• a {a.name} bcc VM is already up[/]")
            return
        raise KbridgeError(
            f"a {a.name} VM without bcc is already up", f"stop it first: kbridge vm down --arch {a.name}"
        )
    vm = targets.boot(a, suite, "bcc", keep=True, memory_mb=memory)
    err.print(f"[green]✓ {a.name} bcc VM up: {vm.krel} ({vm.accel}), pid {vm.describe().get('pid')}[/]")
    vm.release()
