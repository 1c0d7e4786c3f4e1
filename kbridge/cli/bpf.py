"""`kbridge bpf render|up|image`: how --via bpf plants a probe, and the bcc image flavour (for bcc written by hand)."""

from __future__ import annotations

import json
import shlex
from typing import Annotated, Any

import typer

from kbridge import kernels
from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.options import (
    FILTER_OPTIONS,
    SPEC_OPTIONS,
    ArchOpt,
    KernelOpt,
    spec_of,
    with_options,
)
from kbridge.cli.output import command, emit_json, err, out
from kbridge.errors import KbridgeError

bpf_app = typer.Typer(
    help="eBPF: how --via bpf plants a probe (render), and the bcc image for bcc programs written by hand.",
    no_args_is_help=True,
)
app.add_typer(bpf_app, name="bpf")


@bpf_app.command("render")
@command
@with_options(SPEC_OPTIONS, FILTER_OPTIONS)
def render_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function (used as written: no guest is asked).")],
    arch: ArchOpt = None,
    source: Annotated[bool, typer.Option("--source", help="Also print the BPF program's C source.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object: the loader's command line and the config it sets.")
    ] = False,
    **opts: Any,
) -> None:
    """Print how --via bpf plants SYMBOL: the loader's command line and the .rodata config it sets; run nothing.

    Nothing is compiled per probe: one CO-RE object per guest kernel serves every probe.
    """
    from kbridge.images import bpftools
    from kbridge.mechanisms.bpf.plan import config, plan

    a = get_arch(arch)
    spec = spec_of(symbol, a, **opts)
    p = plan(spec, a)
    d = f"{bpftools.GUEST_ROOT}/{bpftools.digest()}"
    argv = p.argv(
        f"{d}/kbridge-bpf", f"{d}/probe.bpf.o", f"{d}/min.btf", [], "/dev/virtio-ports/org.kbridge.bpf", "RUN", None
    )
    text = (bpftools.SOURCE_DIR / "probe.bpf.c").read_text()
    if json_out:
        emit_json({"argv": argv, "config": config(p), **({"source": text} if source else {})})
        return
    if source:
        out.print("/* the BPF program: one object for every probe, compiled on the host */", style="dim")
        out.print(text, markup=False, highlight=False, end="", soft_wrap=True)
    out.print("# the loader's command line (RUN and the excluded pids: per run)", style="dim")
    out.print(shlex.join(argv), markup=False, highlight=False, soft_wrap=True)
    out.print("# what it writes into the object's .rodata (struct kb_config)", style="dim")
    out.print(json.dumps(config(p), indent=1), markup=False, highlight=False, soft_wrap=True)


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
