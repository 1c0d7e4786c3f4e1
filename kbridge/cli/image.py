"""`kbridge image build|list`: the cached guest images built from Debian packages."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kbridge.arch import ARCHES, get_arch
from kbridge.cli import app
from kbridge.cli.output import command, emit_json, out
from kbridge.images import image as images
from kbridge.images.apt import Mirrors, host_mirrors

image_app = typer.Typer(help="Guest images (kernel, headers, initramfs) built from Debian packages.", no_args_is_help=True)
app.add_typer(image_app, name="image")

MirrorOpt = Annotated[Optional[str], typer.Option(
    "--mirror", help="Debian mirror URL (default: the host's Debian sources, else deb.debian.org; env KBRIDGE_MIRROR).")]


def mirrors_from(mirror: str | None, suite: str = images.DEFAULT_SUITE) -> Mirrors | None:
    """Mirrors for --mirror (the security archive stays the host's / default one)."""
    if not mirror:
        return None
    if not mirror.startswith(("http://", "https://", "file:")):
        from kbridge.errors import KbridgeError

        raise KbridgeError(f"invalid --mirror {mirror!r}: expected an http(s):// or file: URL",
                           "e.g. --mirror http://deb.debian.org/debian")
    return Mirrors(mirror.rstrip("/"), host_mirrors(suite).security)


@image_app.command("build")
@command
def build_cmd(arch: Annotated[Optional[str], typer.Option("--arch")] = None,
              mirror: MirrorOpt = None,
              rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even if cached.")] = False) -> None:
    """Build (or check) the default guest image for ARCH."""
    img = images.ensure(get_arch(arch), mirrors=mirrors_from(mirror), rebuild=rebuild)
    out.print(f"{img.arch.name} {img.suite} {img.krel} {img.dir}")


@image_app.command("list")
@command
def list_cmd(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Cached images, verified against their checksums."""
    rows = []
    for a in ARCHES.values():
        img = images.load(a)
        rows.append({"arch": a.name, "suite": images.DEFAULT_SUITE, "ok": img is not None,
                     "kernel": img.krel if img else None, "dir": str(images.image_dir(a, images.DEFAULT_SUITE))})
    if json_out:
        emit_json({"images": rows})
        return
    for r in rows:
        out.print(f"{r['arch']:7} {r['suite']:9} {r['kernel'] or '(not built)':18} {r['dir']}")
