"""The Python API (kbridge.vm / the kbridge_vm fixture) on real guests: probe, trace, run, files."""

from __future__ import annotations

import pytest

import kbridge
from kbridge.api import Guest
from tests.vm.fetch import arg

DD = "dd if=/dev/zero of=/dev/null bs=7 count=3"


def test_probe_reads_like_a_sentence(kbridge_vm: Guest) -> None:
    run = kbridge_vm.probe("ksys_write", pre=True, ret=True, args={"fd": 1, "count": 3}, comm="dd", run=DD)
    writes = [h for h in run.hits if h.handler == "pre" and h.args["fd"] == 1]
    assert [h.args["count"] for h in writes] == [7, 7, 7]
    assert [h.retval for h in run.hits if h.handler == "ret" and h.args["fd"] == 1] == [7, 7, 7]
    assert run.counts["pre"] == run.counts["ret"] == len(run.hits) // 2
    assert run.summary()["mechanisms"]["kmod"]["missed"] == 0
    assert not any(m.startswith("kb_") for m in kbridge_vm.loaded_modules())


def test_probe_via_tracefs_counts_exactly(kbridge_vm: Guest) -> None:
    run = kbridge_vm.probe("ksys_write", args=["fd=1"], comm="dd", run=DD + " status=none", via="tracefs")
    assert [h.args["fd"] for h in run.hits] == [1, 1, 1]  # status=none: dd writes nothing to fd 2
    js = run.summary()["mechanisms"]["tracefs"]
    assert (js["hits"], js["streamed"], js["lost"], js["missed"]) == (3, 3, 0, 0)


def test_trace_lines_as_written(kbridge_vm: Guest) -> None:
    r = kbridge_vm.trace(f"p:apitest/w ksys_write fd={arg(kbridge_vm.arch_info, 1)}:s32", run=DD, comm="dd")
    assert r.counters["apitest/w"] == sum(1 for h in r.hits) >= 3
    assert "apitest" not in kbridge_vm.read_file("/sys/kernel/tracing/kprobe_events").decode()


def test_run_push_and_pull(kbridge_vm: Guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = kbridge_vm.run("uname -m")
    assert res.ok and res.text.strip() == kbridge_vm.arch_info.uname
    src = tmp_path / "in.txt"
    src.write_text("kbridge\n")
    kbridge_vm.push(src, "/tmp/api-in.txt")
    assert kbridge_vm.run(["/bin/cat", "/tmp/api-in.txt"]).text == "kbridge\n"
    out = kbridge_vm.pull("/tmp/api-in.txt", tmp_path / "out.txt")
    assert out.read_text() == "kbridge\n"


def test_kbridge_vm_attaches_the_kept_vm(kbridge_vm: Guest) -> None:
    if kbridge_vm.where.kind != "qemu":
        pytest.skip("kbridge.vm() without a target is the embedded VM")
    with kbridge.vm(arch=kbridge_vm.arch) as vm:
        assert vm.krel == kbridge_vm.krel and vm.name == kbridge_vm.name
        assert vm.probe("ksys_write", comm="dd", run=DD).counts["pre"] >= 3
