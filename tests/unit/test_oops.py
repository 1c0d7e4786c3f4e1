"""Crash reports as the guest kernels printed them (tests/unit/data/oops-ioctl-*.txt: a NULL
dereference in kbring's ioctl, tests/vm/data/kbring, on 6.1): what kbridge blames and shows first."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbridge import oops

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("arch", "site", "fault_line"),
    [
        ("x86_64", "kbring_ioctl+0x1e/0x2b [kbring]", "RIP: 0010:kbring_ioctl+0x1e/0x2b [kbring]"),
        ("arm64", "kbring_ioctl+0x30/0x3c [kbring]", "pc : kbring_ioctl+0x30/0x3c [kbring]"),
    ],
)
def test_the_head_has_the_bug_line_the_faulting_line_and_the_call_trace(arch: str, site: str, fault_line: str) -> None:
    text = (DATA / f"oops-ioctl-{arch}.txt").read_text()
    assert str(oops.faulting_site(text)) == site
    head = oops.head(text)
    assert "NULL pointer dereference" in head[0]
    assert any(line.endswith(fault_line) for line in head)  # arm64 prints it after 13 lines of abort decoding
    trace = next(i for i, line in enumerate(head) if "Call" in line and "race:" in line)
    assert len(head) - trace - 1 == 6  # the first frames
    assert len(head) < len(text.splitlines())


def test_arm_head_starts_at_the_unhandled_fault_and_ends_with_its_headerless_backtrace() -> None:
    """32-bit arm (6.1 armmp): the store to address 0 is a domain fault (user space is closed to the
    kernel), named on "Unhandled fault:" before die()'s "Internal error:"; the backtrace has no header."""
    text = (DATA / "oops-ioctl-arm.txt").read_text()
    assert str(oops.faulting_site(text)) == "kbring_ioctl+0x24/0x3c [kbring]"
    head = oops.head(text)
    assert head[0].endswith("Unhandled fault: page domain fault (0x01b) at 0x00000000")
    assert any(line.endswith("PC is at kbring_ioctl+0x24/0x3c [kbring]") for line in head)
    assert any(line.endswith("LR is at sys_ioctl+0x134/0xc78") for line in head)
    assert head[-2].endswith("kbring_ioctl [kbring] from sys_ioctl+0x134/0xc78")
    assert head[-1].endswith("sys_ioctl from ret_fast_syscall+0x0/0x1c")  # the frames, not the stack dump after
    assert oops.is_crash(head[0]) and len(head) < len(text.splitlines())


def test_a_timestamped_fault_line_is_preferred_to_the_first_frame() -> None:
    text = "[ 1.0] BUG: x\n[ 1.1]  caller+0x1/0x2\n[ 1.2] RIP: 0010:culprit+0x3/0x4 [mod]\n"
    assert str(oops.faulting_site(text)) == "culprit+0x3/0x4 [mod]"
