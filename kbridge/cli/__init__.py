"""The kbridge command line (typer): parse, call the library, show the result with rich."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Drive real kprobes in real Linux kernels (QEMU guests): kernel modules, tracefs and eBPF.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from kbridge.cli import doctor, image, module, probe, vm  # noqa: E402,F401  (commands register on import)

try:
    from kbridge.cli import trace  # noqa: F401
except ImportError:  # pragma: no cover - optional while being written
    pass

for _name in ("inspect", "bpf", "compare"):
    try:
        __import__(f"kbridge.cli.{_name}")
    except ImportError:  # pragma: no cover - optional while being written
        pass
