"""--via bpf without a guest: the loader's command line per spec and arch, and its output decoded.

The output is what the loader (kbridge/guest/bpf/loader.c) wrote in a 6.1 x86_64 guest to --out:
a kprobe on ksys_write reading fd and count (--regs 0,2) and a kretprobe on vfs_read with its
entry, for `dd if=/dev/zero of=/dev/null bs=3 count=2` (--comm dd).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kbridge.arch import ARM64, X86_64
from kbridge.errors import KbridgeError
from kbridge.mechanisms.bpf import collect
from kbridge.mechanisms.bpf.plan import check, config, has_func_ip, plan
from kbridge.spec import make_spec

DATA = Path(__file__).parent / "data"


def test_kprobe_options_name_the_registers_by_the_probe_table() -> None:
    spec = make_spec("ksys_write", {"pre"}, ["fd=1", "count=3"], X86_64, offset=5, pid=7, comm="dd", tid=9)
    p = plan(spec, X86_64)
    assert p.options == (
        *("--kprobe", "ksys_write+0x5", "--regs", "0,2"),
        *("--pid", "7", "--tid", "9", "--comm", "dd"),
    )
    assert p.registers == ("di", "dx")
    argv = p.argv("/l", "/o", "/b", [1, 2], "/port", "r1", True)
    assert argv[:2] == ["/l", "/o"] and argv[-10:] == [
        *("--out", "/port", "--run", "r1", "--exclude", "1,2", "--btf", "/b", "--func-ip", "1"),
    ]


def test_a_syscall_wrapper_reads_the_syscall_abi_registers() -> None:
    # x86_64's 4th syscall argument is r10 (table entry 6), not rcx; arm64's are x0-x5.
    spec = make_spec("__x64_sys_pwrite64", {"pre"}, ["fd=1", "pos=4"], X86_64)
    assert plan(spec, X86_64).options == ("--kprobe", "__x64_sys_pwrite64+0x0", "--regs", "0,6", "--syscall")
    spec = make_spec("__arm64_sys_write", {"pre"}, ["count=3"], ARM64)
    p = plan(spec, ARM64)
    assert p.options == ("--kprobe", "__arm64_sys_write+0x0", "--regs", "2", "--syscall")
    assert config(p)["arg_reg"] == ["count: regs[2]"] and config(p)["syscall"] is True


def test_kretprobe_options() -> None:
    spec = make_spec("vfs_read", {"entry", "ret"}, ["n=3"], ARM64, maxactive=64)
    assert plan(spec, ARM64).options == (
        *("--kretprobe", "vfs_read", "--emit", "entry,ret", "--maxactive", "64", "--regs", "2"),
    )
    ret_only = plan(make_spec("vfs_read", {"ret"}, None, ARM64), ARM64)
    assert ret_only.options == ("--kretprobe", "vfs_read", "--emit", "ret")


def test_refusals_before_any_boot() -> None:
    with pytest.raises(KbridgeError, match="no post handler"):
        check(make_spec("ksys_write", {"post"}, None, X86_64), X86_64)
    with pytest.raises(KbridgeError, match="at most 6 register arguments"):
        check(make_spec("__arm64_sys_write", {"pre"}, ["x=7"], ARM64), ARM64)


def test_func_ip_from_the_kernel_release() -> None:
    assert has_func_ip("6.1.0-57-amd64") and has_func_ip("7.2.13+deb14-arm64") and has_func_ip("5.15.0")
    assert has_func_ip("5.10.0-46-amd64") is False and has_func_ip("weird") is None


def _messages(run: str) -> list[dict]:
    lines = iter(DATA.joinpath("bpf-loader-x86_64.txt").read_text().splitlines())
    return [m for m in collect.messages(lines, run) if m is not None]


def test_kprobe_hits_decoded() -> None:
    msgs = _messages("cap1")
    assert [m["ev"] for m in msgs] == ["ready", "hit", "hit", "hit", "end"]
    assert msgs[0]["format"] == collect.FORMAT and msgs[0]["nargs"] == 2
    dec = collect.Decoder(["fd", "count"], "ksys_write", "x86_64")
    hits = [dec.hit(m["raw"]) for m in msgs if m["ev"] == "hit"]
    assert [h.args for h in hits] == [{"fd": 1, "count": 3}, {"fd": 1, "count": 3}, {"fd": 2, "count": 31}]
    assert {(h.handler, h.comm, h.pid, h.tid, h.cpu) for h in hits} == {("pre", "dd", 287, 287, 0)}
    assert all(h.ip == h.addr + 1 and h.addr == 0xFFFFFFFF81367680 for h in hits)  # after the int3, as a trap leaves it
    assert hits[0].to_json()["flags"] == "0x202" and hits[0].timestamp < hits[1].timestamp
    assert msgs[-1]["counts"]["pre"] == 3 and msgs[-1]["lost"]["pre"] == 0


def test_kretprobe_hits_decoded() -> None:
    msgs = _messages("cap2")
    dec = collect.Decoder(["n"], "vfs_read", "x86_64")
    hits = [dec.hit(m["raw"]) for m in msgs if m["ev"] == "hit"]
    assert [h.handler for h in hits] == ["entry", "ret", "entry", "ret"]
    assert [h.args for h in hits] == [{"n": 3}] * 4
    assert [h.retval for h in hits] == [None, 3, None, 3]  # each 3-byte read of /dev/zero returns 3
    assert all(h.duration_ns and h.ip is None for h in hits[1::2]) and all(h.ip for h in hits[::2])


def test_other_runs_and_broken_lines_are_skipped() -> None:
    lines = iter(
        ["Hr !!!", "Hr AAAA", "Hother AAAA", '{"ev":"end","run":"other"}', "{half", None, '{"ev":"end","run":"r"}']
    )
    assert list(collect.messages(lines, "r")) == [None, {"ev": "end", "run": "r"}]
