"""The CLI imports a command's module only when that command runs; its help table matches the commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kbridge.cli import COMMANDS, app, load


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_line_is_the_commands_own(name: str) -> None:
    cmd = load(name)
    assert cmd.name == name
    assert cmd.get_short_help_str(limit=1000) == COMMANDS[name][1]


def test_help_imports_no_command_module() -> None:
    code = (
        "import sys\nfrom kbridge.cli import app\n"
        "try:\n    app(['--help'], prog_name='kbridge')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('kbridge.') or m in ('psutil', 'jinja2')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['kbridge.cli', 'kbridge.cli.root']"


def test_unknown_command_suggests() -> None:
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["prob"])
    assert res.exit_code == 2
    assert "Did you mean 'probe'" in res.output
