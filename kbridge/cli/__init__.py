"""The kbridge command line: parse, call the library, show the result.

typer (kbridge.cli.root) defines every command, its help and its usage errors. A warm probe is a
few guest round trips, and importing typer and rich costs more host CPU than all of them: so
`kbridge --help` is printed from the table below, and `probe` and `trace` command lines made only
of options they know are parsed by kbridge.cli.fast, which hands anything else to typer.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: `kbridge --help` imports nothing it does not print
if TYPE_CHECKING:
    from typing import Any

    from kbridge.cli.root import LazyGroup, app, load

__all__ = ["COMMANDS", "DESCRIPTION", "LazyGroup", "app", "help_text", "load", "main"]

DESCRIPTION = "Drive real kprobes in real Linux kernels (QEMU or Vagrant guests): kernel modules, tracefs and eBPF."

# name -> (module under kbridge.cli, the help line `kbridge --help` shows), in help order.
# tests/unit/test_cli_lazy.py checks each line against the command's own help.
COMMANDS: dict[str, tuple[str, str]] = {
    "compare": (
        "compare",
        "Run one probe through kmod, tracefs and bpf on one VM and compare hits, losses, args and overhead.",
    ),
    "doctor": ("doctor", "Check the host: tools, compilers, QEMU, KVM, cached images."),
    "inspect": (
        "inspect",
        "Show how the target kernel really plants a kprobe on SYMBOL (bytes before, armed, after removal) and why.",
    ),
    "probe": ("probe", "Probe SYMBOL in a guest kernel and show every hit (default mechanism: a generated module)."),
    "trace": (
        "trace",
        "Define kprobe events in a guest, run a workload, stream the events from trace_pipe, remove them.",
    ),
    "bpf": ("bpf", "eBPF: how --via bpf plants a probe (render), and the bcc image for bcc programs written by hand."),
    "image": ("image", "Guest images (kernel, headers, initramfs) built from Debian packages."),
    "module": ("module", "Kernel modules: kbridge's generated probes (render) and your own (build, load, unload)."),
    "vm": ("vm", "A kept guest VM, reused by later commands."),
    "gdb": ("gdb", "Attach gdb-multiarch to the kept VM's kernel (kbridge vm up --gdb), with your modules' symbols."),
    "lab": ("lab", "Kernel-course labs: start one, check it in a real kernel, see the solution."),
    "box": ("box", "Vagrant boxes (libvirt provider) with kbridge's kernel, for --target vagrant:NAME."),
}


def help_text() -> str:
    """`kbridge --help`: the commands and their help lines (typer's layout without its boxes)."""
    width = max(len(n) for n in COMMANDS)
    lines = ["Usage: kbridge [OPTIONS] COMMAND [ARGS]...", "", f"  {DESCRIPTION}", "", "Options:"]
    lines += ["  --help  Show this message and exit.", "", "Commands:"]
    lines += [f"  {name:{width}}  {text}" for name, (_module, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    """The `kbridge` command."""
    argv = sys.argv[1:]
    if argv == ["--help"]:
        sys.stdout.write(help_text())
        sys.exit(0)
    if argv and argv[0] in ("probe", "trace"):
        from kbridge.cli.fast import run as run_fast

        if (code := run_fast(argv)) is not None:
            sys.exit(code)
    from kbridge.cli.root import run

    run()


def __getattr__(name: str) -> Any:
    """The typer application (`app`, `load`, `LazyGroup`), imported on first use."""
    if name in ("app", "load", "LazyGroup"):
        from kbridge.cli import root

        return getattr(root, name)
    raise AttributeError(name)
