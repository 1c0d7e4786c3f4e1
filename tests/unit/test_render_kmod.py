"""The generated module: what the template renders for each handler set and arch."""

import re

from kbridge.arch import ARM64, X86_64
from kbridge.mechanisms.kmod.render import module_name, render
from kbridge.spec import make_spec


def test_kprobe_with_args_uses_the_calling_convention():
    spec = make_spec("ksys_write", {"pre", "post"}, ["fd=1", "count=3"], X86_64)
    src = render(spec, X86_64).source
    assert src.startswith("// SPDX-License-Identifier: GPL-2.0-only")
    assert "regs_get_kernel_argument(regs, 0);\t/* fd */" in src
    assert "regs_get_kernel_argument(regs, 2);\t/* count */" in src
    assert '.symbol_name = "ksys_write"' in src
    assert "register_kretprobe" not in src
    assert src.count('pr_info("hit=') == 2


def test_syscall_wrapper_reads_the_user_pt_regs():
    for arch in (X86_64, ARM64):
        spec = make_spec(arch.syscall_prefix + "write", {"pre"}, ["count=3"], arch)
        src = render(spec, arch).source
        assert "#include <asm/syscall.h>" in src
        assert "args[0] = sysargs[2];\t/* count */" in src


def test_kretprobe_reports_retval_and_entry_args():
    spec = make_spec("vfs_read", {"ret"}, ["count=3"], ARM64, maxactive=8)
    src = render(spec, ARM64).source
    assert "regs_return_value(regs)" in src
    assert ".maxactive = 8," in src
    assert "kb_fetch_args(regs, d->args);" in src  # fetched at entry, printed at return
    assert "register_kprobe(&kp)" not in src
    assert re.search(r"hit=ret pid=%d tid=%d cpu=%d took=%lluns count=%lu ret=%ld comm=%s", src)


def test_module_names_are_short_unique_identifiers():
    a = make_spec("a" * 120, {"pre"})
    b = make_spec("a" * 120, {"post"})
    assert module_name(a) != module_name(b)
    assert len(module_name(a)) < 56 and re.fullmatch(r"\w+", module_name(a))
    assert module_name(make_spec("x.isra.0", {"pre"})).startswith("kb_x_isra_0_")


def test_compiler_errors_show_the_generated_line():
    from kbridge.kbuild import explain_build_failure

    mod = render(make_spec("ksys_write", {"pre"}, ["fd=1"], X86_64), X86_64)
    line_no = mod.source.splitlines().index("\tatomic64_inc(&hits_pre);") + 1
    gcc = (
        f"{mod.name}.c: In function 'kb_pre':\n"
        f"{mod.name}.c:{line_no}:9: error: implicit declaration of function 'atomic64_inc'\n"
        f"{line_no:5} |         atomic64_inc(&hits_pre);\n"
        "      |         ^~~~~~~~~~~~\n"
        "make[2]: *** [scripts/Makefile.build:250: x.o] Error 1\n"
    )
    text = explain_build_failure(gcc, f"{mod.name}.c")
    # gcc's diagnostic whole: the function it was in, the error with its column, the line and its caret.
    assert text.splitlines()[1:4] == gcc.splitlines()[:3]


def test_handlers_report_probe_address_and_registers():
    for arch, ip, flags in ((X86_64, "ip", "flags"), (ARM64, "pc", "pstate")):
        src = render(make_spec("ksys_write", {"pre", "post"}, ["fd=1"], arch), arch).source
        assert f"addr=0x%lx {ip}=0x%lx {flags}=0x%lx fd=%lu comm=%s" in src
        assert src.count(f"(unsigned long)p->addr, instruction_pointer(regs), (unsigned long)regs->{flags}") == 2


def test_return_hits_carry_their_duration_and_a_histogram():
    src = render(make_spec("vfs_read", {"entry", "ret"}, [], X86_64), X86_64).source
    assert "d->entry_ns = ktime_get_ns();" in src  # per-instance data, set at entry
    assert "took = ktime_get_ns() - d->entry_ns;" in src
    assert "atomic64_inc(&dur_log2[fls64(took)]);" in src
    assert 'pr_info("durations run=%s log2_ns=%s\\n"' in src
    assert src.index('"durations run=') < src.index('"unloaded run=')  # read before the host stops
    pre_only = render(make_spec("vfs_read", {"pre"}, [], X86_64), X86_64).source
    assert "dur_log2" not in pre_only and "took=%llu" not in pre_only


def test_fault_handler_only_where_the_kernel_has_it():
    import pytest

    from kbridge.errors import KbridgeError

    spec = make_spec("ksys_write", {"pre", "post"}, [], X86_64, fault=True)
    src = render(spec, X86_64, "5.10.0-35-amd64").source
    assert ".fault_handler = kb_fault," in src
    assert "static int kb_fault(struct kprobe *p, struct pt_regs *regs, int trapnr)" in src
    assert "#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 14, 0)\n#error" in src  # built for 5.14+: refused
    assert module_name(spec) != module_name(make_spec("ksys_write", {"pre", "post"}, [], X86_64))
    with pytest.raises(KbridgeError) as e:
        render(spec, X86_64, "6.1.0-56-amd64")
    assert "removed in Linux 5.14" in e.value.message and "6.1.0-56-amd64" in e.value.message
    assert "fault_handler" not in render(make_spec("ksys_write", {"pre"}, [], X86_64), X86_64).source
    with pytest.raises(KbridgeError):
        make_spec("vfs_read", {"ret"}, fault=True)  # a kretprobe has no fault handler of its own
