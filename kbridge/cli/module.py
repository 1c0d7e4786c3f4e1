"""`kbridge module render|build|load|unload`: kbridge's generated modules and the user's own.

`render` shows the C kbridge generates for a probe. `build`, `load` and `unload`
handle the user's own out-of-tree module (a directory with a Kbuild or Makefile):
built against the guest kernel's headers, loaded into the kept VM, removed again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.options import (
    GUEST_OPTIONS,
    SPEC_OPTIONS,
    ArchOpt,
    JsonDocOpt,
    KernelOpt,
    KernelTreeOpt,
    arch_or_machine,
    chosen,
    spec_of,
    with_options,
)
from kbridge.cli.output import command, emit_json, err, out
from kbridge.errors import KbridgeError
from kbridge.targets.base import Target

module_app = typer.Typer(
    help="Kernel modules: kbridge's generated probes (render) and your own (build, load, unload).", no_args_is_help=True
)
app.add_typer(module_app, name="module")


@module_app.command("render")
@command
@with_options(SPEC_OPTIONS)
def render_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function (used as written: no guest is asked).")],
    arch: ArchOpt = None,
    json_out: JsonDocOpt = False,
    **opts: Any,
) -> None:
    """Print the module's C source and Kbuild file for SYMBOL; build and load nothing."""
    from kbridge.images import image as images
    from kbridge.mechanisms.kmod.render import render
    from kbridge.session import cached_blacklist, cached_symbols

    a = get_arch(arch)
    spec = spec_of(symbol, a, **opts)
    # With the image's symbol table cached (after a first probe), resolve as a probe
    # would (sys_write -> __x64_sys_write); otherwise render the name as written.
    img = images.load(a, verify=False)
    table = cached_symbols(img) if img else None
    if img and table is not None:
        res = table.resolve(spec.symbol, a, cached_blacklist(img) or frozenset())
        if res.note:
            err.print(f"[cyan]• resolved {res.note}[/]")
        spec = spec.with_symbol(res.symbol)
    mod = render(spec, a)
    if json_out:
        emit_json({"module": mod.name, "files": mod.files})
        return
    for fname, text in mod.files.items():
        # Plain writes: rich would wrap long C lines at the terminal width.
        sys.stdout.write(f"/* ==== {fname} ==== */\n{text}")


DirArg = Annotated[
    Path, typer.Argument(help="Your module's directory (a Kbuild or Makefile with obj-m).", show_default=False)
]


def _show_log(lines: list[str]) -> None:
    for line in lines:
        err.print(f"  [dim]kernel:[/] {escape(line)}")


@module_app.command("build")
@command
def build_cmd(
    src: DirArg,
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    kernel_tree: KernelTreeOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Build your module against the guest kernel's headers (cross-compiled for arm64), cached."""
    from kbridge import kbuild, kernels
    from kbridge.targets import kept_image

    a = get_arch(arch)
    img = kept_image(a, kernels.resolve(kernel, kernel_tree))
    mods = kbuild.build(kbuild.source_files(src), img, str(src), source=src)
    if json_out:
        emit_json(
            {
                "kernel": img.krel,
                "arch": a.name,
                "modules": [{"name": m.name, "ko": str(m.ko), "params": m.params} for m in mods],
                "warnings": list(mods[0].warnings),
            }
        )
        return
    for w in mods[0].warnings:
        err.print(f"[yellow]{escape(w)}[/]")
    for m in mods:
        params = ", ".join(f"{k} ({v})" for k, v in sorted(m.params.items())) or "none"
        err.print(f"[green]✓ {m.name}.ko for {img.krel} ({a.name})[/]: parameters: {escape(params)}")
        out.print(str(m.ko), soft_wrap=True)


@module_app.command("load")
@command
@with_options(GUEST_OPTIONS)
def load_cmd(
    src: DirArg,
    param: Annotated[list[str] | None, typer.Option("--param", help="NAME=VALUE, a module_param (repeatable).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Which module, when obj-m builds several.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    **opts: Any,
) -> None:
    """Build (if needed), push and load your module into the kept VM (booted if none runs); show its kernel log."""
    from kbridge import modules
    from kbridge.targets import acquire

    g = chosen(**opts)
    params = dict(modules.parse_param(p) for p in param or ())
    a = arch_or_machine(g.arch, g.target)  # a Vagrant machine's own arch unless --arch says otherwise
    with acquire(a, keep=True, kernel=g.key, target=g.target) as guest:
        built = modules.build_for(guest, src, name)
        for w in built.warnings:
            err.print(f"[yellow]{escape(w)}[/]")
        try:
            mod = modules.load_module(guest, built, params)
        except modules.LoadError as e:
            if json_out:
                emit_json({"loaded": False, "module": built.name, "errno": e.errno, "log": e.log})
            raise
    if json_out:
        emit_json(
            {
                "loaded": True,
                "module": mod.name,
                "params": mod.params,
                "log": mod.log,
                "arch": guest.arch.name,
                "kernel": guest.krel,
            }
        )
        return
    _show_log(mod.log)
    err.print(f"[green]✓ {mod.name} loaded in the {guest.arch.name} guest ({guest.krel})[/]")
    err.print(f"[dim]  kbridge probe {mod.name}:FUNCTION ... probes it; kbridge module unload {mod.name} removes it[/]")


@module_app.command("unload")
@command
@with_options(GUEST_OPTIONS)
def unload_cmd(
    name: Annotated[str, typer.Argument(help="The module's name (as lsmod shows it).", show_default=False)],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    **opts: Any,
) -> None:
    """rmmod your module from the kept VM; show its exit's kernel log."""
    from kbridge.targets import kept, parse_target

    g = chosen(**opts)
    where = parse_target(g.target)
    if where.kind == "qemu":
        a = get_arch(g.arch)
        vm = kept(a, g.key)
        if vm is None:
            raise KbridgeError(
                f"no {a.name} VM is up, so no module of yours is loaded",
                f"kbridge vm up --arch {a.name}, then kbridge module load DIR",
            )
        guest: Target = vm
    else:
        from kbridge.targets import acquire

        with acquire(arch_or_machine(g.arch, g.target), kernel=g.key, target=where) as guest:
            _unload(guest, name, json_out)
        return
    try:
        _unload(guest, name, json_out)
    finally:
        guest.release()


def _unload(guest: Target, name: str, json_out: bool) -> None:
    from kbridge import modules

    lines = modules.unload_module(guest, name)
    if json_out:
        emit_json({"unloaded": name, "log": lines})
        return
    _show_log(lines)
    err.print(f"[green]✓ {name} unloaded from the {guest.arch.name} guest[/]")
