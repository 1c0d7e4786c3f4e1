"""32-bit arm (Debian armhf, armmp): what kbridge derives from the arch table, offline.

The values come from the real 6.1.0-57-armmp guest: its /proc/kallsyms (data/kallsyms-arm.txt),
the hit lines and decoded-instruction facts its modules printed, and its error_log.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kbridge import kprobe_events
from kbridge.arch import ARCHES, ARM, ARM64, X86_64, describe_fsr, get_arch
from kbridge.errors import KbridgeError
from kbridge.images import bcc as bcc_images
from kbridge.images import box
from kbridge.kprobe_events import EventSyntaxError, grammar_for
from kbridge.mechanisms.bpf.plan import check as bpf_check
from kbridge.mechanisms.kmod.collect import parse_event, parse_hit
from kbridge.mechanisms.kmod.render import render
from kbridge.mechanisms.refusals import explain_refusal
from kbridge.mechanisms.singlestep import SingleStep, insn_run
from kbridge.mechanisms.tracefs.render import render as render_events
from kbridge.spec import Hit, make_spec
from kbridge.symbols import SymbolTable

KALLSYMS = SymbolTable.parse((Path(__file__).parent / "data/kallsyms-arm.txt").read_text())
BOOKWORM = grammar_for("bookworm", ARM)


def test_arm_is_found_by_its_debian_uname_and_elf_names() -> None:
    assert get_arch("armhf") is get_arch("armv7l") is get_arch("arm") is ARM
    assert list(ARCHES) == ["x86_64", "arm64", "arm"]
    assert ARM.kernel_package == "linux-image-armmp" and X86_64.kernel_package == "linux-image-amd64"
    assert (ARM.elf_machine, ARM.elf_class) == (40, 32)
    assert ARM.gcc(12) == "arm-linux-gnueabihf-gcc-12"
    assert ARM.gcc_package(12) == "gcc-12-arm-linux-gnueabihf"
    assert ARM.libc_dev_package() == "libc6-dev-armhf-cross"
    assert ARM.qemu_machine == ("-M", "virt,highmem=off") and ARM.qemu_binary == "qemu-system-arm"


def test_the_breakpoint_keeps_the_probed_instructions_condition() -> None:
    push = bytes.fromhex("f0402de9")  # e92d40f0 push {r4-r7, lr}: condition "always"
    bls = bytes.fromhex("2b00009a")  # 9a00002b bls: condition 9 (ls), at ksys_write+0x38 on 6.1.0-57-armmp
    assert ARM.breakpoint_for(push).hex() == "f801f0e7"  # 0xe7f001f8, as the guest wrote it
    assert ARM.breakpoint_for(bls).hex() == "f801f097"  # 0x97f001f8, as the guest wrote it there
    assert ARM64.breakpoint_for(bls) == ARM64.breakpoint_insn  # BRK has no condition
    assert X86_64.breakpoint_for(b"\x0f\x1f") == b"\xcc"


def test_sys_write_is_the_syscall_itself() -> None:
    assert not ARM.is_syscall_wrapper("sys_write") and ARM.syscall_entry("write") == "sys_write"
    assert KALLSYMS.resolve("sys_write", ARM).symbol == "sys_write"
    r = KALLSYMS.resolve("__sys_write", ARM)  # the old spellings resolve to the syscall, no wrapper
    assert r.symbol == "sys_write" and "syscall entry" in (r.note or "")
    spec = make_spec("sys_write", {"pre"}, ["fd=1", "count=3"], ARM)
    src = render(spec, ARM).source
    assert "asm/syscall.h" not in src and "sysargs" not in src
    assert "args[1] = regs->uregs[2];\t/* count */" in src


def test_arguments_come_from_r0_r3_then_the_stack() -> None:
    assert [ARM.c_arg(i) for i in (0, 3)] == ["regs->uregs[0]", "regs->uregs[3]"]
    assert ARM.c_arg(4) == "((unsigned long *)kernel_stack_pointer(regs))[0]"
    assert X86_64.c_arg(4) == "regs_get_kernel_argument(regs, 4)"
    assert ARM.max_args == 8
    with pytest.raises(KbridgeError, match="out of range on arm") as e:
        make_spec("ksys_write", {"pre"}, ["x=9"], ARM)
    assert "4 in registers, then the stack" in (e.value.hint or "")
    spec = make_spec("ksys_write", {"pre", "post"}, ["fd=1", "count=3", "e=5"], ARM)
    src = render(spec, ARM).source
    assert "args[0] = regs->uregs[0];\t/* fd */" in src
    assert "args[2] = ((unsigned long *)kernel_stack_pointer(regs))[0];\t/* e */" in src
    assert "regs_get_kernel_argument(regs" not in src and "(unsigned long)regs->ARM_cpsr" in src
    # The decoded instruction, printed once at registration (Arch.insn_facts).
    assert 'pr_info("insn handler=%ps slot=%d direct_exec=%d run=%s\\n",' in src
    assert "(void *)kp.ainsn.insn_handler, kp.ainsn.insn != NULL" in src


def test_argn_is_refused_as_the_kernel_refuses_it_and_the_register_named() -> None:
    with pytest.raises(EventSyntaxError) as e:
        kprobe_events.parse("p:myw ksys_write fd=$arg1 count=$arg3", BOOKWORM)
    # Measured on 6.1.0-57-armmp: error_log "Invalid $-variable specified", the caret under the '$'.
    assert (e.value.error, e.value.position) == ("BAD_VAR", 20)
    assert "argument 1 is %r0" in (e.value.specific_hint or "")
    with pytest.raises(EventSyntaxError) as e5:
        kprobe_events.parse("p:myw ksys_write x=$arg5", BOOKWORM)
    assert "argument 5 is $stack0" in (e5.value.specific_hint or "")
    kprobe_events.parse("p:myw ksys_write fd=%r0 count=%r2 s=$stack0 lr=%lr c=%cpsr f=%fp", BOOKWORM)
    with pytest.raises(EventSyntaxError) as bad:
        kprobe_events.parse("p:myw ksys_write v=%r11", BOOKWORM)  # regoffset_table names it fp
    assert bad.value.error == "BAD_REG_NAME"
    # BTF arguments need HAVE_FUNCTION_ARG_ACCESS_API too: never on arm, even on 6.12.
    assert not grammar_for("trixie", ARM).btf_args and grammar_for("trixie", ARM64).btf_args


def test_tracefs_probes_read_registers_and_the_stack() -> None:
    spec = make_spec("ksys_write", {"pre"}, ["fd=1", "count=3", "e=5"], ARM)
    (ev,) = render_events(spec, ARM, BOOKWORM)
    assert ev.line == (
        "p:kbridge/ksys_write_p ksys_write fd=%r0:u64 count=%r2:u64 e=$stack0:u64 kb_ip=%pc:x64 kb_flags=%cpsr:x64"
    )


def test_hit_lines_with_cpsr_and_the_decoded_instruction() -> None:
    line = "kb_x: hit=post pid=7 tid=7 cpu=0 addr=0xc05ce9b0 pc=0xc05ce9b4 cpsr=0x80030013 fd=1 comm=sh"
    hit = parse_hit(line, "kb_x", "ksys_write", arch="arm")
    assert hit is not None and hit.ip == 0xC05CE9B4 and hit.args == {"fd": 1}
    assert hit.to_json()["cpsr"] == "0x80030013" and hit.to_json()["pc"] == "0xc05ce9b4"
    ev = parse_event("kb_x: insn handler=emulate_generic_r2_14_noflags slot=1 direct_exec=1 run=ab", "kb_x")
    assert ev is not None and ev.kind == "insn" and ev.run == "ab"
    assert ev.facts == {"handler": "emulate_generic_r2_14_noflags", "slot": "1", "direct_exec": "1"}


def test_how_the_probed_instruction_runs() -> None:
    # Facts the 6.1 armmp inspect module printed for ksys_write+0 (push) and +0x38 (bls).
    push = {"handler": "emulate_generic_r2_14_noflags", "slot": "1", "direct_exec": "1"}
    bl = {"handler": "simulate_bbl", "slot": "0", "direct_exec": "0"}
    assert insn_run(ARM, "breakpoint", push).startswith("emulated by emulate_generic_r2_14_noflags from")
    assert insn_run(ARM, "breakpoint", bl).startswith("simulated by simulate_bbl in C")
    assert insn_run(ARM, "optimized", push).startswith("copied into the detour buffer")
    assert insn_run(ARM, "optimized", bl).startswith("simulated by simulate_bbl, called from the detour")
    assert insn_run(ARM64, "breakpoint", {}) == "single-stepped out of line"


def test_a_branch_post_handler_sees_its_target() -> None:
    def hit(handler: str, pc: int) -> Hit:
        return Hit("kmod", "ksys_write", handler, 1, "sh", 0, addr=0xC05CE9D8, ip=pc, arch="arm", mode="breakpoint")

    # Measured: ksys_write+0x28, a bl, left pc at its target for the post-handler.
    text = SingleStep(hit("pre", 0xC05CE9D8), hit("post", 0xC05F4C60)).text()
    assert text.startswith("no single-step: pc 0xc05ce9d8 -> 0xc05f4c60")
    assert "a branch" in text and "its target" in text
    assert (
        "4-byte instruction was simulated or emulated"
        in SingleStep(hit("pre", 0xC05CE9D8), hit("post", 0xC05CE9DC)).text()
    )


def test_refusals_name_the_cause() -> None:
    e = explain_refusal(errno.EINVAL, "kprobe", ARM, "ksys_write", 0xC, True)
    assert "bl __gnu_mcount_nc" in e.message and "decoder rejects" in e.message
    e = explain_refusal(errno.EINVAL, "kprobe", ARM, "ksys_write", 6, True)
    assert "not a multiple of 4" in e.message and "0x4 or 0x8" in (e.hint or "")
    assert "ftrace call site" in explain_refusal(errno.EINVAL, "kprobe", ARM64, "ksys_write", 4, True).message


def test_bcc_and_vagrant_boxes_are_refused_before_anything_runs() -> None:
    with pytest.raises(KbridgeError, match=r"eBPF probe is built for x86_64 and arm64, not arm"):
        bpf_check(make_spec("ksys_write", {"pre"}, [], ARM), ARM)
    with pytest.raises(KbridgeError, match="cannot compile kprobe programs for 32-bit arm"):
        bcc_images.ensure(ARM)
    with pytest.raises(KbridgeError, match="no Vagrant box for 32-bit arm"):
        box.ensure(ARM)


def test_fault_status_decoded() -> None:
    # arch/arm/mm/fsr-2level.c: FS 7 is a page translation fault; bit 11 a write.
    assert describe_fsr(0x7) == "FSR 0x7: page translation fault, on a read"
    assert describe_fsr(0x817) == "FSR 0x817: page translation fault, on a write"
    assert ARM.is_data_fault(0x5) and not ARM.is_data_fault(0x1)
    assert ARM.describe_trap(0x7).startswith("FSR 0x7")


def test_the_conditional_breakpoint_is_named_in_the_disassembly() -> None:
    from kbridge.inspect import disassemble

    # ksys_write+0x38 armed on 6.1.0-57-armmp: capstone decodes no conditional udf, kbridge names it.
    lines = disassemble(bytes.fromhex("f801f097243095e5"), ARM, 0xC05CE9E8)
    assert lines == [
        "c05ce9e8: f8 01 f0 97 udf #0x18 (the kprobe breakpoint, with the condition field 0x9 of the instruction)",
        "c05ce9ec: 24 30 95 e5 ldr r3, [r5, #0x24]",
    ]
