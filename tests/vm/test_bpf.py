"""The bpf mechanism on real guests: kbridge's CO-RE probe, loaded by its libbpf loader in any image."""

from __future__ import annotations

import pytest

from kbridge import targets
from kbridge.images import bpftools
from kbridge.mechanisms import bpf
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
    assert r.counters["pre"] == len(r.hits) == 201 and r.lost == 0
    assert all(h.comm == "dd" and h.tid == h.pid for h in r.hits)
    assert all(h.ip is not None and h.ip - session.arch.pre_ip_offset == h.addr for h in r.hits)


def test_kretprobe_return_values(session: Session) -> None:
    spec = make_spec("vfs_read", {"entry", "ret"}, ["n=3"], session.arch, comm="dd")
    r = bpf.MECHANISM.run(session, spec, DD, StopRule())
    assert r.counters["ret"] >= 200 and r.counters["entry"] == r.counters["ret"]
    rets = [h for h in r.hits if h.handler == "ret"]
    assert sum(1 for h in rets if h.retval == 1 and h.args == {"n": 1}) == 200  # bs=1 reads of /dev/zero return 1
    assert all(h.duration_ns and h.duration_ns > 0 for h in rets)


def test_syscall_wrapper_args_and_pid_filter(session: Session) -> None:
    # The wrapper's only argument is the user pt_regs: fd and count are read through it.
    wrapper = session.arch.syscall_entry("write")
    spec = make_spec(wrapper, {"pre"}, ["fd=1", "count=3"], session.arch, comm="dd")
    r = bpf.MECHANISM.run(session, spec, Workload.shell("dd if=/dev/zero of=/dev/null bs=5 count=2"), StopRule())
    assert [h.args for h in r.hits][:2] == [{"fd": 1, "count": 5}] * 2
    pid = session.target.guest_pid(session.target.spawn(["/bin/busybox", "sleep", "30"]))
    try:
        spec = make_spec("ksys_write", {"pre"}, None, session.arch, pid=pid)
        r = bpf.MECHANISM.run(session, spec, DD, StopRule())
        assert r.counters["pre"] == 0 and not r.hits  # dd wrote; the sleeping pid did not
    finally:
        session.target.run(["/bin/busybox", "kill", str(pid)])


def test_attach_error_is_explained_and_leaves_nothing(session: Session) -> None:
    # ksys_write+1 is inside the first instruction on both arches: the kernel refuses it.
    spec = make_spec("ksys_write", {"pre"}, None, session.arch, offset=1)
    with pytest.raises(bpf.BpfError) as e:
        bpf.MECHANISM.run(session, spec, DD, StopRule())
    cause = "EILSEQ" if session.arch.decodes_insns else "EINVAL"
    assert "could not attach to 'ksys_write+0x1'" in e.value.message and cause in e.value.message
    assert "ksys_write" not in session.kprobes_list()
    with pytest.raises(bpf.BpfError) as e:
        bpf.MECHANISM.run(session, make_spec("kb_no_such_function", {"pre"}, None, session.arch), DD, StopRule())
    assert "ENOENT" in e.value.message and "not in the kernel's symbol table" in e.value.message


def test_the_default_image_needs_no_bcc(session: Session) -> None:
    """A guest of the default image (no python3-bpfcc) boots with the loader; one without it gets it pushed."""
    guest = targets.boot(session.arch)
    try:
        s = Session(guest)
        assert guest.flavour == "default" and guest.bcc_python() is None
        tools = bpftools.built(guest.image)
        assert tools is not None
        assert guest.run(["/bin/busybox", "test", "-x", f"{tools.guest_dir}/kbridge-bpf"]).ok  # from the initramfs
        spec = make_spec("ksys_write", {"pre"}, ["count=3"], session.arch, comm="dd")
        assert bpf.MECHANISM.run(s, spec, DD, StopRule()).counters == {"pre": 201}
        # A guest without it (a Vagrant machine, a host that could not build it at boot): pushed, once.
        assert guest.run(["/bin/busybox", "rm", "-r", tools.guest_dir]).ok
        r = bpf.MECHANISM.run(s, spec, DD, StopRule())
        assert r.counters == {"pre": 201} and len(r.hits) == 201
        assert guest.run(["/bin/busybox", "test", "-x", f"{tools.guest_dir}/kbridge-bpf"]).ok
        assert "ksys_write" not in s.kprobes_list()
    finally:
        targets.shutdown(guest)


def test_btf_from_the_kernel_file_is_the_guests(session: Session) -> None:
    """kbridge.images.btf reads the BTF out of the file QEMU boots (an ELF vmlinux, or an arm64 Image):
    byte for byte what the running kernel serves, so vmlinux.h and the minimal BTF describe it."""
    import hashlib

    from kbridge.images import btf

    blob = btf.extract(session.image.kernel.read_bytes())
    res = session.target.run(["/bin/busybox", "sha256sum", "/sys/kernel/btf/vmlinux"])
    assert res.ok and res.text.split()[0] == hashlib.sha256(blob).hexdigest()
