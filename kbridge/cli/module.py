"""`kbridge module render|build`: the generated C, shown or built, without running anything."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.output import command, emit_json, err
from kbridge.spec import make_spec

module_app = typer.Typer(help="Generated kernel modules: render or build them without loading.", no_args_is_help=True)
app.add_typer(module_app, name="module")


@module_app.command("render")
@command
def render_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function (used as written: no guest is asked).")],
    pre: Annotated[bool, typer.Option("--pre")] = False,
    post: Annotated[bool, typer.Option("--post")] = False,
    entry: Annotated[bool, typer.Option("--entry")] = False,
    ret: Annotated[bool, typer.Option("--ret")] = False,
    arg: Annotated[Optional[list[str]], typer.Option("--arg", help="NAME=N")] = None,
    offset: Annotated[int, typer.Option("--offset")] = 0,
    maxactive: Annotated[int, typer.Option("--maxactive")] = 0,
    arch: Annotated[Optional[str], typer.Option("--arch")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the module's C source and Kbuild file for SYMBOL; build and load nothing."""
    from kbridge.render.kmod import render

    from kbridge.images import image as images
    from kbridge.session import cached_blacklist, cached_symbols

    a = get_arch(arch)
    handlers = {h for h, on in (("pre", pre), ("post", post), ("entry", entry), ("ret", ret)) if on}
    spec = make_spec(symbol, handlers, arg, a, offset, maxactive)
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
