"""The bpf mechanism on real guests booted from the bcc image (Debian python3-bpfcc)."""

from __future__ import annotations

import pytest

from kbridge import targets
from kbridge.errors import KbridgeError
from kbridge.mechanisms import bpf
from kbridge.mechanisms.bpf.render import BpfProgram
from kbridge.mechanisms.engine import StopRule
from kbridge.session import Session
from kbridge.spec import make_spec
from kbridge.workload import Workload

pytestmark = pytest.mark.vm

DD = Workload.shell("dd if=/dev/zero of=/dev/null bs=1 count=200")  # comm "dd" (the applet link)


def test_kprobe_counts_and_args(session: Session) -> None:
    spec = make_spec("ksys_write", {"pre"}, ["fd=1", "count=3"], session.arch, comm="dd")
    r = bpf.MECHANISM.run(session, spec, DD, StopRule())
    # busybox dd: 200 one-byte writes to fd 1, then its summary to fd 2.
    ones = [h for h in r.hits if h.args == {"fd": 1, "count": 1}]
    assert len(ones) == 200
    assert r.counters["pre"] == len(r.hits) and r.lost == 0
    assert all(h.comm == "dd" for h in r.hits)


def test_kretprobe_return_values(session: Session) -> None:
    spec = make_spec("vfs_read", {"ret"}, None, session.arch, comm="dd")
    r = bpf.MECHANISM.run(session, spec, DD, StopRule())
    assert r.counters["ret"] >= 200
    assert sum(1 for h in r.hits if h.retval == 1) == 200  # each bs=1 read of /dev/zero returns 1


def test_compile_error_is_clear_and_leaves_nothing(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec("ksys_write", {"pre"}, None, session.arch)
    broken = BpfProgram(
        "int kb_pre(struct pt_regs *ctx) { return no_such_variable; }\n",
        [{"type": "kprobe", "symbol": "ksys_write", "offset": 0, "fn": "kb_pre"}],
        spec,
    )
    monkeypatch.setattr(bpf, "render", lambda s, a: broken)
    with pytest.raises(bpf.BpfError) as e:
        bpf.MECHANISM.run(session, spec, DD, StopRule())
    assert "could not compile" in e.value.message and "no_such_variable" in e.value.message
    assert "ksys_write" not in session.kprobes_list()


def test_attach_error_is_clear_and_leaves_nothing(session: Session) -> None:
    # ksys_write+1 is inside the first instruction on both arches: the kernel refuses it.
    spec = make_spec("ksys_write", {"pre"}, None, session.arch, offset=1)
    with pytest.raises(bpf.BpfError) as e:
        bpf.MECHANISM.run(session, spec, DD, StopRule())
    assert "could not attach to 'ksys_write'+0x1" in e.value.message
    assert "ksys_write" not in session.kprobes_list()


def test_default_image_says_what_is_missing(session: Session) -> None:
    # A real guest booted from the default image (no python3-bpfcc), not the bcc one the tests keep.
    guest = targets.boot(session.arch)
    try:
        with pytest.raises(KbridgeError) as e:
            bpf.MECHANISM.run(Session(guest), make_spec("ksys_write", {"pre"}, None, session.arch), DD, StopRule())
        assert "has no bcc" in str(e.value) and "kbridge bpf up" in str(e.value)
        assert "ksys_write" not in Session(guest).kprobes_list()
    finally:
        targets.shutdown(guest)
