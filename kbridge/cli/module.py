"""`kbridge module render|build`: the generated C, shown or built, without running anything."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.output import command, emit_json, out
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

    a = get_arch(arch)
    handlers = {h for h, on in (("pre", pre), ("post", post), ("entry", entry), ("ret", ret)) if on}
    spec = make_spec(symbol, handlers, arg, a, offset, maxactive)
    mod = render(spec, a)
    if json_out:
        emit_json({"module": mod.name, "files": mod.files})
        return
    for fname, text in mod.files.items():
        out.print(f"/* ==== {fname} ==== */", style="dim")
        out.print(text, markup=False, highlight=False, end="")
