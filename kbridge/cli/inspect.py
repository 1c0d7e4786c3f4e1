"""`kbridge inspect SYMBOL`: address, aliases, blacklist, ftrace, probe mode and the bytes the probe writes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kbridge import kernels
from kbridge.arch import ARCHES, get_arch
from kbridge.cli import app
from kbridge.cli.options import KernelOpt, KernelTreeOpt, TargetOpt, VagrantfileOpt, use_vagrantfile
from kbridge.cli.output import command, emit_json, err, out
from kbridge.errors import KbridgeError
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
            help="Force the breakpoint (int3 / BRK #4 / UDF #24): jump optimization off while armed and the "
            "probe moved past an ftrace site if needed; both restored and reported.",
        ),
    ] = False,
    arch: Annotated[
        Optional[str],
        typer.Option(
            "--arch",
            help="Guest architecture: x86_64, arm64 or arm (default: the host's); 'all': each of them, side by "
            "side, with the breakpoint each one plants.",
            rich_help_panel="Guest",
        ),
    ] = None,
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
    if arch == ALL:
        _inspect_all(symbol, offset, force_breakpoint, kernel, target, json_out)
        return
    a = get_arch(arch) if arch else None
    with acquire(arch=a, kernel=kernels.resolve(kernel, kernel_tree), target=target) as vm:
        ins = inspect(Session(vm), symbol, offset, force_breakpoint=force_breakpoint)
    if json_out:
        emit_json(ins.to_json())
    else:
        show(ins)


ALL = "all"


def _inspect_all(
    symbol: str, offset: int, force_breakpoint: bool, kernel: str | None, target: str | None, json_out: bool
) -> None:
    """--arch all: the same inspection on a live kernel of each arch, one after another, and the
    breakpoint each plants (a second, forced inspection where the kernel chose another mode)."""
    if target:
        raise KbridgeError(
            f"--arch all inspects the embedded VM of each arch; it takes no --target (got {target!r})",
            "drop --target, or give one --arch",
        )
    results: dict[str, tuple[Inspection, Inspection]] = {}
    for a in ARCHES.values():
        with acquire(arch=a, kernel=kernel) as vm:
            session = Session(vm)
            first = inspect(session, symbol, offset, force_breakpoint=force_breakpoint)
            forced = first if first.mode in ("breakpoint", "blacklisted") else inspect(session, symbol, offset, True)
        results[a.name] = (first, forced)
    if json_out:
        emit_json({name: {"as_armed": f.to_json(), "breakpoint": b.to_json()} for name, (f, b) in results.items()})
        return
    show_all(results)


def _first(ins: Inspection, step: str) -> str:
    """The first instruction of STEP's disassembly, without its address."""
    lines = ins.disasm.get(step) or []
    return lines[0].split(": ", 1)[-1] if lines else "-"


def _word(ins: Inspection) -> str:
    """The breakpoint the armed bytes start with, as the arch's instruction word."""
    arch = get_arch(ins.arch)
    armed = bytes.fromhex(ins.insn.get("armed", ""))[: len(arch.breakpoint_insn)]
    if ins.mode != "breakpoint" or not armed:
        return "-"
    return f"{int.from_bytes(armed, 'little'):#0{2 + 2 * len(armed)}x}"


def show_all(results: dict[str, tuple[Inspection, Inspection]]) -> None:
    """The inspections of each arch side by side: a column per arch."""
    names = list(results)
    first = next(iter(results.values()))[0]
    t = Table(title=f"a kprobe on {first.symbol}+{first.requested_offset:#x}, on each arch", show_header=True)
    t.add_column("", style="bold")
    for name in names:
        t.add_column(name)

    def row(label: str, cell: Callable[[Inspection, Inspection], str]) -> None:
        t.add_row(label, *(escape(cell(*results[n])) for n in names))

    row("kernel", lambda f, b: f.kernel)
    row("probe address", lambda f, b: f"{f.probe_address:#x}" if f.probe_address else "-")
    row("before", lambda f, b: _first(f, "before"))
    row("mode, as armed", lambda f, b: f.mode or "-")
    row("armed", lambda f, b: _first(f, "armed"))
    row("breakpoint at", lambda f, b: f"{b.symbol}+{b.offset:#x}" + (" (--breakpoint)" if b is not f else ""))
    row("breakpoint armed", lambda f, b: _first(b, "armed"))
    row("breakpoint word", lambda f, b: _word(b))
    row("the trap", lambda f, b: get_arch(b.arch).breakpoint_name)
    row("pre-handler sees", lambda f, b: f"{get_arch(b.arch).ip_register} = probe +{get_arch(b.arch).pre_ip_offset}")
    row("probed instruction", lambda f, b: b.insn_run or "-")
    row("restored after", lambda f, b: _restored(f) + ("" if b is f else f" / {_restored(b)}"))
    out.print(t)


def _restored(ins: Inspection) -> str:
    return "yes" if ins.insn.get("before") and ins.insn.get("before") == ins.insn.get("after") else "no"


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
    if ins.insn_run:
        t.add_row("probed instruction", ins.insn_run)
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
