"""kbridge compare on real guests: kmod, tracefs and bpf agree on a deterministic workload."""

from __future__ import annotations

import pytest

from kbridge.compare import compare
from kbridge.session import Session
from kbridge.spec import make_spec

pytestmark = pytest.mark.vm

DD = "dd if=/dev/zero of=/dev/null bs=1 count=300"


def test_three_mechanisms_equal_counts(session: Session) -> None:
    spec = make_spec("ksys_write", {"pre"}, ["fd=1", "count=3"], session.arch, comm="dd")
    comp = compare(session, spec, DD, repeats=2)
    ran = {n: m for n, m in comp.mechanisms.items() if m.result is not None}
    assert set(ran) == {"kmod", "tracefs", "bpf"}, {n: m.skipped for n, m in comp.mechanisms.items()}
    totals = {n: m.result.total for n, m in ran.items()}
    # Each repetition: 300 one-byte writes by dd plus one write of its summary to stderr.
    assert set(totals.values()) == {2 * 301}, totals
    assert comp.equal_counts
    assert all(m.agree in ("reference", "yes") for m in ran.values())
    assert all(m.result.first_event_s is not None and m.overhead_ns is not None for m in ran.values())
    js = comp.summary()["mechanisms"]
    assert set(js) == {"kmod", "tracefs", "bpf"} and js["bpf"]["hits"] == 602


def test_kretprobe_return_values_agree(session: Session) -> None:
    spec = make_spec("vfs_read", {"ret"}, None, session.arch, comm="dd")
    comp = compare(session, spec, DD, repeats=1)
    ran = {n: m for n, m in comp.mechanisms.items() if m.result is not None}
    assert set(ran) == {"kmod", "tracefs", "bpf"}
    assert comp.equal_counts
    for m in ran.values():
        assert m.agree in ("reference", "yes"), (m.name, m.agree)
        assert sum(1 for h in m.result.hits if h.retval == 1) == 300
