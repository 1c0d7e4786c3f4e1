"""`kbridge box build|list|remove|prune`: Vagrant boxes (libvirt) from the same Debian packages as the images."""

from __future__ import annotations

import shutil
from typing import Annotated, Optional

import typer
from rich.markup import escape

from kbridge import progress
from kbridge.arch import ARCHES, get_arch
from kbridge.cli import app
from kbridge.cli.image import MirrorOpt, mirrors_from
from kbridge.cli.options import JsonDocOpt
from kbridge.cli.output import command, emit_json, err, out
from kbridge.images import box as boxes
from kbridge.images import image as images
from kbridge.images import vagrantboxes

box_app = typer.Typer(
    help="Vagrant boxes (libvirt provider) with kbridge's kernel, for --target vagrant:NAME.", no_args_is_help=True
)
app.add_typer(box_app, name="box")


@box_app.command("build")
@command
def build_cmd(
    arch: Annotated[
        Optional[str], typer.Option("--arch", help="x86_64 or arm64 (default: the host's; no box for arm).")
    ] = None,
    bcc: Annotated[bool, typer.Option("--bcc", help="Add python3-bpfcc and the kernel headers (--via bpf).")] = False,
    mirror: MirrorOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even if cached.")] = False,
    add: Annotated[bool, typer.Option("--add/--no-add", help="Run `vagrant box add` (needs vagrant).")] = True,
) -> None:
    """Build (or check) the box for ARCH and add it to Vagrant as kbridge/SUITE-ARCH."""
    box = boxes.ensure(get_arch(arch), bcc=bcc, mirrors=mirrors_from(mirror), rebuild=rebuild)
    if add and shutil.which("vagrant"):
        with progress.step(f"vagrant box add {box.name} (version {box.version})"):
            vagrantboxes.vagrant_add(box)
    elif add:
        progress.warn(
            "vagrant is not installed: install vagrant and vagrant-libvirt, then run this command again to add the box"
        )
    out.print(f"{box.name} {box.version} {box.krel} {box.dir}")


@box_app.command("list")
@command
def list_cmd(json_out: JsonDocOpt = False) -> None:
    """Built boxes and whether Vagrant has them (`vagrant box list`)."""
    added = vagrantboxes.added_boxes()
    rows = []
    for a in ARCHES.values():
        if a.box_refusal:
            continue
        for bcc in (False, True):
            box = boxes.load(a, bcc=bcc)
            name = boxes.box_name(a, images.DEFAULT_SUITE, bcc)
            if box is None and bcc:
                continue  # the bcc variant is listed only once built
            rows.append(
                {
                    "name": name,
                    "arch": a.name,
                    "bcc": bcc,
                    "built": box is not None,
                    "version": box.version if box else None,
                    "kernel": box.krel if box else None,
                    "added": bool(box and box.version in added.get(name, [])),
                    "dir": str(boxes.box_dir(a, images.DEFAULT_SUITE, bcc)),
                }
            )
    if json_out:
        emit_json({"boxes": rows})
        return
    for r in rows:
        state = ("added" if r["added"] else "built, not added") if r["built"] else "not built"
        out.print(f"{r['name']:28} {r['kernel'] or '-':18} {state:17} {r['dir']}")


@box_app.command("remove")
@command
def remove_cmd(
    arch: Annotated[Optional[str], typer.Option("--arch", help="x86_64 or arm64 (default: the host's).")] = None,
    bcc: Annotated[bool, typer.Option("--bcc", help="The box with python3-bpfcc.")] = False,
    keep_cache: Annotated[bool, typer.Option("--keep-cache", help="Keep kbridge's build of the box.")] = False,
) -> None:
    """Remove the box from Vagrant and its disk from libvirt's pool (and kbridge's build of it)."""
    done = vagrantboxes.remove(get_arch(arch), bcc=bcc, keep_cache=keep_cache)
    for what in done:
        err.print(f"[green]✓ removed {escape(what)}[/]")
    if not done:
        err.print(f"nothing to remove for {boxes.box_name(get_arch(arch), images.DEFAULT_SUITE, bcc)}")


@box_app.command("prune")
@command
def prune_cmd() -> None:
    """Remove older versions of kbridge's boxes from Vagrant and their disks from libvirt's pool."""
    done = vagrantboxes.prune()
    for what in done:
        err.print(f"[green]✓ removed {escape(what)}[/]")
    if not done:
        err.print("no older box versions")
