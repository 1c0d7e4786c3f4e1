"""The kbridge command line (typer): parse, call the library, show the result with rich.

Commands are registered here by name, with the module that defines them and
their one-line help; a module is imported only when its command runs (`kbridge
probe` never imports the image builder, `kbridge --help` imports none of them).
Each module registers its commands on `app` when imported, as usual with typer.
"""

from __future__ import annotations

import importlib
import sys
from difflib import get_close_matches
from typing import Any

import typer
import typer.main
from typer import _click
from typer.core import TyperCommand, TyperGroup

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
    "bpf": ("bpf", "eBPF through bcc in the guest: render programs, build and boot the bcc image."),
    "image": ("image", "Guest images (kernel, headers, initramfs) built from Debian packages."),
    "module": ("module", "Kernel modules: kbridge's generated probes (render) and your own (build, load, unload)."),
    "vm": ("vm", "A kept guest VM, reused by later commands."),
    "gdb": ("gdb", "Attach gdb-multiarch to the kept VM's kernel (kbridge vm up --gdb), with your modules' symbols."),
    "lab": ("lab", "Kernel-course labs: start one, check it in a real kernel, see the solution."),
    "box": ("box", "Vagrant boxes (libvirt provider) with kbridge's kernel, for --target vagrant:NAME."),
}


class LazyGroup(TyperGroup):
    """The top-level group: a command's module is imported when that command is looked up to run.

    Listing commands (the help page) uses the table above, so it imports nothing.
    """

    _listing = False

    def list_commands(self, ctx: _click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: _click.Context, cmd_name: str) -> _click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name not in COMMANDS:
            return None
        if self._listing:
            return TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])
        cmd = self.commands[cmd_name] = load(cmd_name)
        return cmd

    def format_help(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(self, ctx: _click.Context, args: list[str]) -> Any:
        try:
            return self._click_resolve_command(ctx, args)
        except _click.exceptions.UsageError as e:
            if args and (matches := get_close_matches(args[0], list(COMMANDS))):
                e.message = f"{e.message.rstrip('.')}. Did you mean {', '.join(map(repr, matches))}?"
            raise


app = typer.Typer(
    help="Drive real kprobes in real Linux kernels (QEMU or Vagrant guests): kernel modules, tracefs and eBPF.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=LazyGroup,
)


@app.callback()
def _root() -> None:
    # A callback makes typer build a group even though no command is registered at import.
    pass


def main() -> None:
    """The `kbridge` command. A usage error (an unknown option, a value out of range) is one line
    that quotes the input, like every other error, not a box."""
    try:
        code = app(standalone_mode=False)
    except _click.exceptions.NoArgsIsHelpError as e:  # `kbridge`, `kbridge vm`: the help, as asked
        sys.stderr.write(e.format_message() + "\n")
        sys.exit(2)
    except _click.exceptions.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "kbridge"
        sys.stderr.write(f"error: {e.format_message()}\n  hint: {where} --help\n")
        sys.exit(2)
    except _click.exceptions.ClickException as e:
        sys.stderr.write(f"error: {e.format_message()}\n")
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def load(name: str) -> _click.Command:
    """Import the module of command NAME (it registers on `app`) and return the click command."""
    importlib.import_module(f"kbridge.cli.{COMMANDS[name][0]}")
    opts: dict[str, Any] = {
        "pretty_exceptions_short": app.pretty_exceptions_short,
        "rich_markup_mode": app.rich_markup_mode,
    }
    for info in app.registered_commands:
        if info.name == name:
            return typer.main.get_command_from_info(info, **opts)
    for group in app.registered_groups:
        if group.name == name:
            return typer.main.get_group_from_info(group, suggest_commands=app.suggest_commands, **opts)
    raise LookupError(f"kbridge.cli.{COMMANDS[name][0]} does not register {name!r}")
