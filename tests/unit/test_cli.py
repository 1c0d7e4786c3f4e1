"""The offline commands through typer's CliRunner: help texts, render-only output, --check, error exits.

None of these boots a VM: each either renders, validates, or refuses before any guest is involved.
"""

from __future__ import annotations

import json

import pytest
import typer.main
from typer import _click
from typer.testing import CliRunner

from kbridge.arch import ARM64
from kbridge.cli import app
from kbridge.mechanisms.kmod.render import render
from kbridge.spec import make_spec

runner = CliRunner()

COMMANDS = [
    [],
    ["probe"],
    ["trace"],
    ["compare"],
    ["inspect"],
    ["doctor"],
    ["vm"],
    ["vm", "up"],
    ["vm", "status"],
    ["vm", "exec"],
    ["vm", "down"],
    ["module"],
    ["module", "render"],
    ["bpf"],
    ["bpf", "render"],
    ["bpf", "up"],
    ["image"],
    ["image", "build"],
    ["image", "list"],
    ["module", "build"],
    ["module", "load"],
    ["module", "unload"],
    ["vm", "push"],
    ["vm", "pull"],
    ["lab"],
    ["lab", "list"],
    ["lab", "start"],
    ["lab", "check"],
    ["lab", "solution"],
    ["box"],
    ["box", "build"],
    ["box", "list"],
    ["box", "remove"],
    ["box", "prune"],
]


def run(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def _command(path: list[str]):  # type: ignore[no-untyped-def]  # typer's own click types
    """The command behind `kbridge PATH...` (subcommands loaded as the CLI loads them)."""
    cmd = typer.main.get_command(app)
    for name in path:
        found = cmd.get_command(_click.Context(cmd), name)  # type: ignore[attr-defined]  # a group
        assert found is not None, name
        cmd = found
    return cmd


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "kbridge")
def test_every_option_of_every_command_says_what_it_does(cmd: list[str]) -> None:
    res = run(*cmd, "--help")
    assert res.exit_code == 0, res.output
    command = _command(cmd)
    for param in command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert (param.help or "").strip(), f"kbridge {' '.join(cmd)} {param.opts[0]} has no help text"
            assert param.opts[0] in res.output, f"{param.opts[0]} missing from kbridge {' '.join(cmd)} --help"


def test_removed_kernel_features_are_grouped_under_kernel_history() -> None:
    probe = _command(["probe"])
    panels = {p.opts[0]: getattr(p, "rich_help_panel", None) for p in probe.params if p.param_type_name == "option"}
    history = {opt for opt, panel in panels.items() if panel and panel.startswith("Kernel history")}
    assert history == {"--jprobe", "--fault"}


def test_trace_check_good_and_bad_lines() -> None:
    res = run("trace", "--check", "p:myw ksys_write fd=$arg1", "--arch", "x86_64")
    assert res.exit_code == 0 and "✓" in res.output
    res = run("trace", "--check", "p:foo/bar.1 vfs_read", "--arch", "x86_64")
    assert res.exit_code == 1
    assert "BAD_EVENT_NAME" in res.output and "^" in res.output


def test_trace_check_json() -> None:
    res = run("trace", "--check", "--json", "p:a ksys_write", "p:b ksys_write x=%nope", "--arch", "arm64")
    verdicts = [json.loads(line) for line in res.stdout.splitlines()]
    assert [v["ok"] for v in verdicts] == [True, False]
    assert verdicts[1]["error"] == "BAD_REG_NAME" and verdicts[1]["position"] is not None
    assert res.exit_code == 1


def test_trace_same_event_name_in_two_groups_is_refused_before_any_boot() -> None:
    res = run("trace", "p:a/foo ksys_write", "p:b/foo vfs_read", "--arch", "x86_64")
    assert res.exit_code == 2
    assert "trace_pipe prints both as 'foo'" in res.output


def test_trace_syntax_error_shows_line_and_caret() -> None:
    res = run("trace", "p:x ksys_write +0($arg2):nosuchtype", "--arch", "x86_64")
    assert res.exit_code == 2
    assert "BAD_TYPE" in res.output and "^" in res.output


def test_module_render_prints_exactly_what_is_built() -> None:
    res = run("module", "render", "ksys_write", "--pre", "--ret", "--arch", "arm64")
    assert res.exit_code == 0, res.output
    # sys_write is resolved offline as the module's build would: the module kbridge would build.
    mod = render(make_spec("ksys_write", {"pre", "ret"}, None, ARM64), ARM64)
    for text in mod.files.values():
        assert text.strip() in res.stdout


def test_bpf_render_json() -> None:
    res = run("bpf", "render", "vfs_read", "--ret", "--arg", "n=3", "--json", "--arch", "x86_64", "--source")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["argv"][2:7] == ["--kretprobe", "vfs_read", "--emit", "ret", "--regs"] and doc["argv"][7] == "2"
    assert doc["config"]["arg_reg"] == ["n: dx"] and doc["config"]["track_ret"] is True
    assert 'SEC("kretprobe")' in doc["source"]


def test_bpf_render_refuses_post() -> None:
    res = run("bpf", "render", "vfs_read", "--post", "--arch", "x86_64")
    assert res.exit_code == 2 and "no post handler" in res.output


@pytest.mark.parametrize(
    "args,quoted",
    [
        (["probe", "ksys write", "--pre"], "'ksys write'"),
        (["probe", "ksys_write", "--pre", "--arg", "x=²"], "'x=²'"),
        (["probe", "ksys_write", "--pre", "--arg", "fd"], "'fd'"),
        (["probe", "ksys_write", "--pre", "--pid", "99999999"], "99999999"),
        (["probe", "ksys_write", "--pre", "--offset", "4294967296"], "4294967296"),
        (["probe", "ksys_write", "--pre", "--via", "dtrace"], "'dtrace'"),
        (["probe", "ksys_write", "--pre", "--arch", "mips"], "'mips'"),
        (["probe", "ksys_write", "--pre", "--kernel", "4.19"], "'4.19'"),
        (["probe", "ksys_write", "--pre", "--target", "vagrant:bad name"], "'vagrant:bad name'"),
        (["probe", "ksys_write", "--post", "--via", "bpf"], "post handler"),
        (["probe", "ksys_write", "--pre", "--comm", "has space"], "'has space'"),
        (["probe", "ksys_write", "--ret", "--offset", "4"], "ksys_write+0x4"),
        (["probe", "ksys_write", "--jprobe"], "jprobes were removed in Linux 4.15"),
        (["probe", "ksys_write", "--pre", "--fault"], "removed in Linux 5.14"),
        (["compare", "ksys_write", "--only", "perf"], "'perf'"),
        (["trace", "p:x ksys_write", "--comm", 'a"b'], "'a\"b'"),
    ],
)
def test_bad_input_is_one_line_with_the_input_quoted(args: list[str], quoted: str) -> None:
    res = run(*args, "--arch", "x86_64") if "--arch" not in args else run(*args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert quoted in res.output, res.output
    assert res.output.startswith("error:") or "error:" in res.output.splitlines()[0]


def test_syscall_args_at_an_offset_are_refused_before_any_boot() -> None:
    res = run("probe", "__x64_sys_write", "--pre", "--offset", "16", "--arg", "fd=1", "--arch", "x86_64")
    assert res.exit_code == 2
    assert "only holds it at the function entry" in res.output


def test_trace_check_refuses_a_non_breaking_space() -> None:
    # The kernel's isspace() counts byte 0xA0 as a space: the line would split where it shows none.
    res = run("trace", "--check", "p:x ksys_write\u00a0fd=$arg1", "--arch", "x86_64")
    assert res.exit_code == 1 and "non-ASCII" in res.output and "^" in res.output


def _commands_with(option: str) -> list[list[str]]:
    return [c for c in COMMANDS if c and any(option in p.opts for p in _command(c).params)]


def test_every_command_that_takes_a_target_takes_a_vagrantfile() -> None:
    """The hint for a missing Vagrantfile names --vagrantfile DIR: every --target command has it."""
    with_target = _commands_with("--target")
    assert len(with_target) >= 9
    assert with_target == _commands_with("--vagrantfile")


def test_vagrantfile_that_is_not_one_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = run("vm", "exec", "--target", "vagrant", "--vagrantfile", str(tmp_path), "--", "true")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"invalid --vagrantfile {str(tmp_path)!r}: no Vagrantfile there" in res.output, res.output
