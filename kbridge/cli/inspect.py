"""`kbridge inspect SYMBOL`: address, aliases, blacklist, ftrace, probe mode and the bytes the probe writes."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kbridge import kernels
from kbridge.arch import get_arch
from kbridge.cli import app
from kbridge.cli.options import ArchOpt, KernelOpt, KernelTreeOpt, TargetOpt, VagrantfileOpt, use_vagrantfile
from kbridge.cli.output import command, emit_json, err, out
from kbridge.inspect import STEPS, Inspection, inspect
from kbridge.session import Session
from kbridge.spec import validate_symbol
from kbridge.targets import acquire


@app.command("inspect")
@command
def inspect_cmd(
    symbol: Annotated[str, typer.Argument(help="Kernel function, e.g. ksys_write (sys_write resolves too).")],
    offset: Annotated[
        int, typer.Option("--offset", min=0, help="Probe at SYMBOL+OFFSET (a breakpoint inside the function).")
    ] = 0,
    force_breakpoint: Annotated[
        bool,
        typer.Option(
            "--breakpoint",
            help="Force the breakpoint (int3 / BRK #4): jump optimization off while armed and the probe moved "
            "past an ftrace site if needed; both restored and reported.",
        ),
    ] = False,
    arch: ArchOpt = None,
    kernel: KernelOpt = None,
    kernel_tree: KernelTreeOpt = None,
    target: TargetOpt = None,
    vagrantfile: VagrantfileOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object: symbol, address, mode, why, insn {before, armed, after}.")
    ] = False,
) -> None:
    """Show how the target kernel really plants a kprobe on SYMBOL (bytes before, armed, after removal) and why."""
    use_vagrantfile(vagrantfile)
    validate_symbol(symbol)
    a = get_arch(arch) if arch else None
    with acquire(arch=a, kernel=kernels.resolve(kernel, kernel_tree), target=target) as vm:
        ins = inspect(Session(vm), symbol, offset, force_breakpoint=force_breakpoint)
    if json_out:
        emit_json(ins.to_json())
    else:
        show(ins)


def show(ins: Inspection) -> None:
    if ins.note:
        err.print(f"[cyan]• resolved {escape(ins.note)}[/]")
    for change in ins.changes:
        err.print(f"[cyan]• {escape(change)}[/]")
    t = Table(title=f"{ins.symbol}+{ins.offset:#x} on {ins.kernel} ({ins.arch})", show_header=False)
    t.add_column("fact", style="bold")
    t.add_column("value")
    t.add_row("address", f"{ins.address:#x}" + (f" (probe at {ins.probe_address:#x})" if ins.probe_address else ""))
    t.add_row("aliases", ", ".join(ins.aliases) or "none")
    t.add_row("blacklisted", "yes: kprobes refuse it" if ins.blacklisted else "no")
    t.add_row("ftrace-able", "yes (available_filter_functions)" if ins.ftraceable else "no")
    if ins.probe_address:
        t.add_row("ftrace site", "yes: the kernel flagged this address at registration" if ins.ftrace_site else "no")
    if ins.optimization is not None:
        forced = ins.breakpoint and ins.optimization != "0"
        t.add_row("kprobes-optimization", ins.optimization + (" (0 while armed: --breakpoint)" if forced else ""))
    t.add_row("mode while armed", ins.mode or "-")
    if ins.probe_address:
        t.add_row(
            "hits while armed", f"{ins.hits} (the module's exact count, read after removal; missed {ins.nmissed})"
        )
    for step in STEPS:
        if step in ins.insn:
            t.add_row(f"bytes {step}", ins.insn[step])
            t.add_row(f"kprobes/list {step}", escape(ins.list_lines.get(step) or "(not listed)"))
    out.print(t)
    if ins.why:
        out.print(f"[bold]why:[/] {escape(ins.why)}")
    for step in STEPS:
        if ins.disasm.get(step):
            out.print(f"[bold]{step}[/]")
            for line in ins.disasm[step][:6]:
                out.print(f"  {line}", markup=False)
