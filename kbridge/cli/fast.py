"""The usual `kbridge probe` and `kbridge trace` command lines, parsed without typer.

Importing typer (and what it brings: click, pydantic, rich) costs a warm probe more host CPU than
its guest work. A command line made only of options the tables below know, with values of the
plain shapes (a decimal number, a word), is parsed here and run at once; anything else (--help, an
unknown option, `--`, a value typer might read differently, a range to check) gives None, and typer
parses it, with its own help and usage errors. tests/unit/test_cli_fast.py checks the tables
against typer's declarations, and that both parse every sample command line the same way.
"""

from __future__ import annotations

import re

# option -> (parameter of the command function, kind): flag, str, int, float, or list (repeatable str)
PROBE: dict[str, tuple[str, str]] = {
    "--pre": ("pre", "flag"),
    "--post": ("post", "flag"),
    "--entry": ("entry", "flag"),
    "--ret": ("ret", "flag"),
    "--arg": ("arg", "list"),
    "--offset": ("offset", "int"),
    "--maxactive": ("maxactive", "int"),
    "--pid": ("pid", "int"),
    "--tid": ("tid", "int"),
    "--comm": ("comm", "str"),
    "--run": ("run", "str"),
    "--count": ("count", "int"),
    "--duration": ("duration", "float"),
    "--via": ("via", "str"),
    "--arch": ("arch", "str"),
    "--kernel": ("kernel", "str"),
    "--kernel-tree": ("kernel_tree", "str"),
    "--target": ("target", "str"),
    "--vagrantfile": ("vagrantfile", "str"),
    "--mirror": ("mirror", "str"),
    "--json": ("json_out", "flag"),
    "--jprobe": ("jprobe", "flag"),
    "--fault": ("fault", "flag"),
    "--fault-handler": ("fault", "flag"),
}
TRACE: dict[str, tuple[str, str]] = {
    "--check": ("check", "flag"),
    "--run": ("run", "str"),
    "--duration": ("duration", "float"),
    "--count": ("count", "int"),
    "--filter": ("filter_", "str"),
    "--pid": ("pid", "int"),
    "--tid": ("tid", "int"),
    "--comm": ("comm", "str"),
    "--buffer-kb": ("buffer_kb", "int"),
    "--arch": ("arch", "str"),
    "--kernel": ("kernel", "str"),
    "--kernel-tree": ("kernel_tree", "str"),
    "--target": ("target", "str"),
    "--vagrantfile": ("vagrantfile", "str"),
    "--json": ("json_out", "flag"),
    "--steps": ("steps", "flag"),
}
# (options, the positional parameter, whether it takes several, the command's defaults)
COMMANDS: dict[str, tuple[dict[str, tuple[str, str]], str, bool]] = {
    "probe": (PROBE, "symbol", False),
    "trace": (TRACE, "lines", True),
}
MIN_ONE = frozenset({"buffer_kb"})  # typer checks min=1 on these: 0 goes to typer, which says so
_INT = re.compile(r"[0-9]{1,18}")
_FLOAT = re.compile(r"[0-9]{1,9}(\.[0-9]{0,9})?|\.[0-9]{1,9}")


def parse(command: str, args: list[str]) -> dict | None:
    """The keyword arguments of COMMAND's function for ARGS, or None when typer should parse them."""
    options, positional, several = COMMANDS[command]
    kwargs: dict = {}
    values: list[str] = []
    it = iter(args)
    for token in it:
        if not token.startswith("-"):
            values.append(token)
            continue
        name, eq, inline = token.partition("=")
        if name not in options:
            return None  # --help, an unknown option, `--`, "-:event" (a trace line typer takes as text)
        param, kind = options[name]
        if kind == "flag":
            if eq:
                return None
            kwargs[param] = True
            continue
        value = inline if eq else next(it, None)
        if value is None or value.startswith("-"):
            return None
        if kind == "list":
            kwargs.setdefault(param, []).append(value)
        elif kind == "int":
            if not _INT.fullmatch(value) or (param in MIN_ONE and int(value) < 1):
                return None
            kwargs[param] = int(value)
        elif kind == "float":
            if not _FLOAT.fullmatch(value):
                return None
            kwargs[param] = float(value)
        else:
            kwargs[param] = value
    if not values or (len(values) > 1 and not several):
        return None
    kwargs[positional] = values if several else values[0]
    return kwargs


def run(argv: list[str]) -> int | None:
    """Run `kbridge ARGV` (probe or trace) and return its exit status; None: typer's to parse."""
    kwargs = parse(argv[0], argv[1:])
    if kwargs is None:
        return None
    from kbridge.cli.output import guarded

    if argv[0] == "probe":
        from kbridge.cli.probing import probe

        return guarded(probe, **kwargs)
    from kbridge.cli.tracing import trace

    return guarded(trace, **kwargs)
