"""`kbridge image build|list`: the cached guest images built from Debian packages, per kernel and arch."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from kbridge import kernels
from kbridge.arch import ARCHES, get_arch
from kbridge.cli import app
from kbridge.cli.options import ArchOpt, JsonDocOpt, KernelOpt, KernelTreeOpt
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
    kernel_tree: KernelTreeOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every Debian kernel x arch of the matrix.")] = False,
    mirror: MirrorOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even if cached.")] = False,
    keep_tree: Annotated[
        bool,
        typer.Option(
            "--keep-tree",
            help="--kernel debug: keep its source and build directory (~2.8 GB) in the cache, for --kernel-tree "
            "and gdb's source listings.",
        ),
    ] = False,
) -> None:
    """Build (or check) the guest image of KERNEL for ARCH; prints the kernel release it gives."""
    if all_ and (arch or kernel or kernel_tree):
        raise KbridgeError("--all builds every Debian kernel and arch: drop --arch/--kernel, or drop --all")
    suites = list(kernels.SUITES) if all_ else [kernels.resolve(kernel, kernel_tree)]
    if keep_tree and suites != [kernels.DEBUG]:
        raise KbridgeError("--keep-tree is for the debug kernel, which kbridge compiles", "add --kernel debug")
    arches = list(ARCHES.values()) if all_ else [get_arch(arch)]
    for suite in suites:
        for a in arches:
            t0 = time.monotonic()
            if suite == kernels.DEBUG:
                from kbridge.images import debugkernel

                mirrors = mirrors_from(mirror, kernels.DEBUG_SUITE)
                img = debugkernel.ensure(a, mirrors, rebuild=rebuild, keep_tree=keep_tree)
            elif (tree := kernels.tree_of(suite)) is not None:
                from kbridge.images import kerneltree

                img = kerneltree.ensure(tree, a, mirrors_from(mirror, kernels.DEBUG_SUITE))
            else:
                img = images.ensure(a, suite, mirrors=mirrors_from(mirror, suite), rebuild=rebuild)
            label = "debug" if suite == kernels.DEBUG else ("tree" if kernels.tree_of(suite) else img.suite)
            out.print(
                f"{img.arch.name:7} {label:9} {img.krel:24} {img.version:14} {time.monotonic() - t0:6.1f}s {img.dir}"
            )


@image_app.command("list")
@command
def list_cmd(json_out: JsonDocOpt = False) -> None:
    """Every kernel x arch of the matrix, and the debug kernel: the release its cached image gives, or not built."""
    from kbridge.images import debugkernel

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
    for a in ARCHES.values():
        dbg = debugkernel.load(a)
        info = debugkernel.build_info(dbg) if dbg else {}
        rows.append(
            {
                "arch": a.name,
                "suite": kernels.DEBUG,
                "kernel_line": f"{kernels.SUITES[kernels.DEBUG_SUITE].version}, KASAN lockdep UBSAN",
                "default": False,
                "ok": dbg is not None,
                "kernel": dbg.krel if dbg else None,
                "version": dbg.version if dbg else None,
                "dir": str(debugkernel.image_dir(a)),
                "build_s": info.get("total_wall_s"),
                "tree": str(debugkernel.kept_tree(a) or "") or None,
            }
        )
    if json_out:
        emit_json({"images": rows})
        return
    labels = [f"{r['suite']} ({r['kernel_line']})" + ("*" if r["default"] else "") for r in rows]
    width = max(map(len, labels))
    for r, label in zip(rows, labels, strict=True):
        kernel = (
            f"{r['kernel']} ({r['version']})"
            if r["ok"]
            else f"(not built: kbridge image build --kernel {r['suite']} --arch {r['arch']})"
        )
        if r["suite"] == kernels.DEBUG and not r["ok"]:
            kernel = kernel[:-1] + ", ~10 min)"
        out.print(f"{r['arch']:7} {label:{width}} {kernel}")
