"""`kbridge probe` and `kbridge trace` parsed without typer (kbridge.cli.fast) mean what typer makes of them.

The tables are checked against typer's own declarations, and each sample command line is parsed
both ways into the keyword arguments the command function receives: equal, or the fast parser
declines it (None) and typer parses it.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kbridge.cli import fast, load, probing, tracing

FUNCS = {"probe": probing, "trace": tracing}


def _typer_kwargs(monkeypatch: pytest.MonkeyPatch, command: str, args: list[str]) -> dict | None:
    """What typer hands the command function for ARGS (None: typer refused them)."""
    from kbridge.cli import app

    seen: list[dict] = []
    monkeypatch.setattr(FUNCS[command], command, lambda **kw: seen.append(kw))
    res = CliRunner().invoke(app, [command, *args])
    return seen[0] if res.exit_code == 0 and seen else None


@pytest.mark.parametrize("command", ["probe", "trace"])
def test_the_tables_are_typers_options(command: str) -> None:
    options, positional, several = fast.COMMANDS[command]
    cmd = load(command)
    declared = {}
    kinds = {bool: "flag", int: "int", float: "float", str: "str", list[str]: "list"}
    for p in cmd.params:
        kind = kinds[p.type_descriptor.annotation]
        if not p.opts[0].startswith("-"):  # the positional parameter
            assert p.name == positional and (kind == "list") == several
            continue
        assert (p.min is not None) == (p.name in fast.MIN_ONE) and p.max is None, p.name
        for opt in p.opts:
            declared[opt] = (p.name, kind)
    assert declared == options
    # Every parameter of the command function is one the parser can fill, or the positional one.
    params = set(inspect.signature(getattr(FUNCS[command], command)).parameters)
    assert params == {name for name, _ in options.values()} | {positional}


PROBES = [
    ["ksys_write", "--pre"],
    ["ksys_write", "--pre", "--post", "--arg", "fd=1", "--arg", "count=3", "--comm", "dd", "--json"],
    ["vfs_read", "--ret", "--entry", "--maxactive", "20", "--count", "5", "--duration", "2.5", "--via", "bpf"],
    ["--arch", "arm64", "ksys_write", "--pre", "--offset", "8", "--pid", "12", "--tid", "13"],
    ["ksys_write", "--pre", "--run", "echo hi > /tmp/x", "--kernel", "5.10", "--fault-handler"],
    ["ksys_write", "--pre", "--run=dd if=/dev/zero of=/dev/null", "--target", "vagrant:m", "--jprobe"],
    ["ksys_write", "--pre", "--offset", "5", "--offset", "7", "--duration", ".5", "--mirror", "http://m/debian"],
    # declined: typer's to parse (and to refuse, or read in its own way)
    ["ksys_write", "--pre", "--offset", "0x10"],
    ["ksys_write", "--pre", "--offset", "-1"],
    ["ksys_write", "--pre", "--duration", "1e3"],
    ["ksys_write", "--pre", "--help"],
    ["ksys_write", "--pre", "--pre=1"],
    ["ksys_write", "--pre", "--bogus"],
    ["ksys_write", "vfs_read", "--pre"],
    ["--pre"],
    ["ksys_write", "--", "--pre"],
    ["ksys_write", "--pre", "--comm"],
]
TRACES = [
    ["p:myw ksys_write fd=$arg1"],
    ["p:a ksys_write", "r:b vfs_read $retval", "--run", "echo hi", "--json", "--steps", "--buffer-kb", "64"],
    ["--check", "p:x ksys_write", "--arch", "x86_64", "--kernel", "6.12"],
    ["p:x ksys_write", "--filter", "fd == 1", "--pid", "3", "--tid", "4", "--comm", "sh", "--count", "2"],
    ["p:x ksys_write", "--duration", "3", "--target", "qemu"],
    # declined
    ["-:x", "--check"],
    ["p:x ksys_write", "--buffer-kb", "0"],
    ["p:x ksys_write", "--count", "+3"],
    [],
]


@pytest.mark.parametrize(("command", "args"), [("probe", a) for a in PROBES] + [("trace", a) for a in TRACES])
def test_parsed_as_typer_parses_it(monkeypatch: pytest.MonkeyPatch, command: str, args: list[str]) -> None:
    mine = fast.parse(command, args)
    if mine is None:
        return  # typer's to parse: whatever it makes of it is what kbridge does
    defaults = {
        k: p.default
        for k, p in inspect.signature(getattr(FUNCS[command], command)).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    theirs = _typer_kwargs(monkeypatch, command, args)
    assert theirs is not None, f"typer refuses what the fast parser accepted: {args}"
    assert {**defaults, **mine} == theirs


def test_declined_samples_are_declined() -> None:
    declined = [a for a in PROBES if fast.parse("probe", a) is None]
    assert len(declined) == 10
    assert [a for a in TRACES if fast.parse("trace", a) is None] == TRACES[-4:]


def test_help_and_a_probe_line_import_neither_typer_nor_rich() -> None:
    code = (
        "import sys\nfrom kbridge.cli import fast, help_text\n"
        "help_text(); fast.parse('probe', ['ksys_write', '--pre', '--json'])\n"
        "import kbridge.cli.probing, kbridge.cli.tracing\n"
        "print(sorted(m for m in ('typer', 'rich', 'click', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "kbridge", "--help"], capture_output=True, text=True, check=True).stdout
    from kbridge.cli import COMMANDS

    assert out.startswith("Usage: kbridge [OPTIONS] COMMAND [ARGS]...")
    for name, (_module, text) in COMMANDS.items():
        assert f"  {name}" in out and text in out
