"""The kbridge command line (typer): parse, call the library, show the result with rich."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Drive real kprobes in real Linux kernels (QEMU or Vagrant guests): kernel modules, tracefs and eBPF.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module registers its commands on `app` when imported.
from kbridge.cli import (  # noqa: E402,F401
    bpf,
    compare,
    doctor,
    image,
    inspect,
    module,
    probe,
    trace,
    vm,
)
from kbridge.cli import lab  # noqa: E402,F401
from kbridge.cli import box  # noqa: E402,F401
