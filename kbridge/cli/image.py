"""`kbridge image build|list`: the cached guest images built from Debian packages, per kernel and arch."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from kbridge import kernels
from kbridge.arch import ARCHES, get_arch
from kbridge.cli import app
from kbridge.cli.options import ArchOpt, JsonDocOpt, KernelOpt
from kbridge.cli.output import command, emit_json, out
from kbridge.errors import KbridgeError
from kbridge.images import image as images
from kbridge.images.apt import Mirrors, host_mirrors

image_app = typer.Typer(
    help="Guest images (kernel, headers, initramfs) built from Debian packages.", no_args_is_help=True
)
app.add_typer(image_app, name="image")

MirrorOpt = Annotated[
    Optional[str],
    typer.Option(
        "--mirror",
        help="Debian mirror URL (default: the host's Debian sources, else deb.debian.org; env KBRIDGE_MIRROR).",
    ),
]


def mirrors_from(mirror: str | None, suite: str = images.DEFAULT_SUITE) -> Mirrors | None:
    """Mirrors for --mirror (the security archive stays the host's / default one)."""
    if not mirror:
        return None
    if not mirror.startswith(("http://", "https://", "file:")):
        raise KbridgeError(
            f"invalid --mirror {mirror!r}: expected an http(s):// or file: URL",
            "e.g. --mirror http://deb.debian.org/debian",
        )
    return Mirrors(mirror.rstrip("/"), host_mirrors(suite).security)


@image_app.command("build")
@command
def build_cmd(
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every kernel x arch of the matrix.")] = False,
    mirror: MirrorOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even if cached.")] = False,
) -> None:
    """Build (or check) the guest image of KERNEL for ARCH; prints the kernel release it gives."""
    if all_ and (arch or kernel):
        raise KbridgeError("--all builds every kernel and arch: drop --arch/--kernel, or drop --all")
    suites = list(kernels.SUITES) if all_ else [kernels.resolve(kernel)]
    arches = list(ARCHES.values()) if all_ else [get_arch(arch)]
    for suite in suites:
        for a in arches:
            t0 = time.monotonic()
            img = images.ensure(a, suite, mirrors=mirrors_from(mirror, suite), rebuild=rebuild)
            out.print(
                f"{img.arch.name:7} {img.suite:9} {img.krel:24} {img.version:14} "
                f"{time.monotonic() - t0:6.1f}s {img.dir}"
            )


@image_app.command("list")
@command
def list_cmd(json_out: JsonDocOpt = False) -> None:
    """Every kernel x arch of the matrix: the release its cached image gives, or not built."""
    rows = []
    for suite in kernels.SUITES.values():
        for a in ARCHES.values():
            img = images.load(a, suite.name, verify=False)
            rows.append(
                {
                    "arch": a.name,
                    "suite": suite.name,
                    "kernel_line": suite.version,
                    "default": suite.name == kernels.DEFAULT,
                    "ok": img is not None,
                    "kernel": img.krel if img else None,
                    "version": img.version if img else None,
                    "dir": str(images.image_dir(a, suite.name)),
                }
            )
    if json_out:
        emit_json({"images": rows})
        return
    for r in rows:
        label = f"{r['suite']} ({r['kernel_line']})" + ("*" if r["default"] else "")
        kernel = (
            f"{r['kernel']} ({r['version']})"
            if r["ok"]
            else f"(not built: kbridge image build --kernel {r['suite']} --arch {r['arch']})"
        )
        out.print(f"{r['arch']:7} {label:17} {kernel}")
