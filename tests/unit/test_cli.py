"""The offline commands through typer's CliRunner: help texts, render-only output, --check, error exits.

None of these boots a VM: each either renders, validates, or refuses before any guest is involved.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kbridge.cli import app

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
]


def run(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "kbridge")
def test_every_command_has_help(cmd: list[str]) -> None:
    res = run(*cmd, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


def test_probe_help_lists_kernel_history_flags() -> None:
    res = run("probe", "--help")
    assert "Kernel history" in res.output and "--jprobe" in res.output and "--fault" in res.output
    assert "--kernel" in res.output and "--target" in res.output


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


def test_module_render_prints_c_and_kbuild() -> None:
    res = run("module", "render", "ksys_write", "--pre", "--ret", "--arch", "arm64")
    assert res.exit_code == 0, res.output
    assert "register_kprobe" in res.output and "register_kretprobe" in res.output
    assert "obj-m" in res.output


def test_bpf_render_json() -> None:
    res = run("bpf", "render", "vfs_read", "--ret", "--arg", "n=3", "--json", "--arch", "x86_64")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert "kb_ret" in doc["text"] and [a["type"] for a in doc["attach"]] == ["kprobe", "kretprobe"]


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
