"""`kbridge gdb`: gdb-multiarch on a kept VM's kernel (started with `kbridge vm up --gdb`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from kbridge import kernels, targets
from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.options import ArchOpt, KernelOpt, KernelTreeOpt
from kbridge.cli.output import command, err
from kbridge.errors import KbridgeError
from kbridge.paths import state_dir


@app.command("gdb")
@command
def gdb_cmd(
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    kernel_tree: KernelTreeOpt = None,
    script: Annotated[
        Optional[list[Path]],
        typer.Option("-x", "--command", help="A gdb command file to run after kbridge's (repeatable)."),
    ] = None,
    ex: Annotated[
        Optional[list[str]], typer.Option("--ex", help="A gdb command to run after those (repeatable).")
    ] = None,
    batch: Annotated[
        bool, typer.Option("--batch", help="Run the commands, then detach and exit (gdb -batch).")
    ] = False,
    dbg: Annotated[
        bool,
        typer.Option(
            "--dbg", help="Debian kernels: fetch vmlinux with DWARF from linux-image-KREL-dbg first (~860 MB)."
        ),
    ] = False,
    show: Annotated[bool, typer.Option("--show", help="Print the gdb commands kbridge would run, and exit.")] = False,
) -> None:
    """Attach gdb-multiarch to the kept VM's kernel (kbridge vm up --gdb), with your modules' symbols."""
    from kbridge import debugger

    for f in script or ():
        if not f.is_file():
            raise KbridgeError(f"gdb command file {str(f)!r} does not exist")
    a = get_arch(arch)
    key = kernels.resolve(kernel, kernel_tree)
    # As it is: after a bug report the kernel is there to be looked at, not restarted.
    vm = targets.kept_as_is(a, key)
    if vm is None:
        raise KbridgeError(
            f"no {a.name} {kernels.label(key)} VM is up", f"start one with {kernels.up_hint(a.name, key)} --gdb"
        )
    try:
        if dbg and vm.image.vmlinux is None:
            if not kernels.is_debian(vm.image.key):
                raise KbridgeError("--dbg fetches Debian's debug package: this kernel is not Debian's")
            from kbridge.images.dbgvmlinux import fetch_dbg_vmlinux

            fetch_dbg_vmlinux(vm.image)
        plan = debugger.prepare(vm)
    finally:
        vm.release()  # gdb stops the guest at will: other kbridge commands wait for it, not for this lock
    for note in plan.notes:
        err.print(f"[yellow]! {escape(note)}[/]")
    for m in plan.modules:
        err.print(f"[dim]• {m.name}: symbols from {escape(str(m.ko))} (built from {escape(m.source)})[/]")
    if show:
        sys.stdout.write("\n".join(plan.commands()) + "\n")  # as gdb reads them: never wrapped
        return
    state_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", prefix="gdb-", suffix=".gdb", dir=state_dir(), delete=False) as tmp:
        tmp.write("\n".join(plan.commands()) + "\n")
        ours = Path(tmp.name)
    argv = plan.argv(ours, script or [], ex or [], batch)
    cwd = plan.vmlinux.parent if plan.vmlinux is not None else None  # lx-symbols also scans the current directory
    # Ctrl-C belongs to gdb (it stops the guest); kbridge only waits for it. A handler, not SIG_IGN:
    # an ignored signal stays ignored in the child, a handled one is back to its default there.
    old = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = subprocess.run(argv, cwd=cwd, check=False).returncode
    finally:
        signal.signal(signal.SIGINT, old)
        ours.unlink(missing_ok=True)
    raise typer.Exit(code)
