"""`kbridge inspect SYMBOL`: address, aliases, blacklist, ftrace, probe mode and the bytes the probe writes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.output import command, emit_json, err, out
from kbridge.inspect import STEPS, Inspection, inspect
from kbridge.session import Session, open_target
from kbridge.spec import validate_symbol


@app.command("inspect")
@command
def inspect_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function, e.g. ksys_write (sys_write resolves too).")],
    offset: Annotated[int, typer.Option("--offset", min=0, help="Probe at SYMBOL+OFFSET (a breakpoint inside the function).")] = 0,
    arch: Annotated[Optional[str], typer.Option("--arch", help="x86_64 or arm64 (default: the host's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object: symbol, address, mode, insn {before, armed, after}.")] = False,
) -> None:
    """Show how the target kernel really plants a kprobe on SYMBOL (bytes before, armed, after removal)."""
    validate_symbol(symbol)
    a = get_arch(arch)
    with open_target(a) as vm:
        ins = inspect(Session(vm), symbol, offset)
    if json_out:
        emit_json(ins.to_json())
    else:
        show(ins)


def show(ins: Inspection) -> None:
    if ins.note:
        err.print(f"[cyan]• resolved {ins.note}[/]")
    t = Table(title=f"{ins.symbol}+{ins.offset:#x} on {ins.kernel} ({ins.arch})", show_header=False)
    t.add_column("fact", style="bold")
    t.add_column("value")
    t.add_row("address", f"{ins.address:#x}" + (f" (probe at {ins.probe_address:#x})" if ins.probe_address else ""))
    t.add_row("aliases", ", ".join(ins.aliases) or "none")
    t.add_row("blacklisted", "yes: kprobes refuse it" if ins.blacklisted else "no")
    t.add_row("ftrace-able", "yes (available_filter_functions)" if ins.ftraceable else "no")
    t.add_row("mode while armed", ins.mode or "-")
    if ins.probe_address:
        t.add_row("hits while armed", str(ins.hits))
    for step in STEPS:
        if step in ins.insn:
            t.add_row(f"bytes {step}", ins.insn[step])
            t.add_row(f"kprobes/list {step}", ins.list_lines.get(step) or "(not listed)")
    out.print(t)
    for step in STEPS:
        if ins.disasm.get(step):
            out.print(f"[bold]{step}[/]")
            for line in ins.disasm[step][:6]:
                out.print(f"  {line}", markup=False)
