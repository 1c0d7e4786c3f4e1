"""What register_kprobe()/register_kretprobe() errors mean, with the actual cause where kbridge can tell it:
a generated module's, and the kernel's under an eBPF program's attach (the same registration).

The generic meanings are kernel/kprobes.c's (6.1); the arch-specific causes come from
the Arch table (instruction alignment, the ftrace site, instruction decoding).
"""

from __future__ import annotations

import errno as errnos
import os

from kbridge.arch import Arch
from kbridge.errors import KbridgeError

REGISTER_ERRORS: dict[int, str] = {
    errnos.ENOENT: "the symbol is not in the kernel's symbol table (kallsyms_lookup_name failed)",
    errnos.EINVAL: "the address cannot be probed: it is on the kprobe blacklist, not in kernel text, "
    "not inside the function, or (arm64, arm) the ftrace call site or not a multiple of 4, or (arm) an "
    "instruction its kprobes decoder rejects",
    errnos.EILSEQ: "the offset is not at an instruction boundary (x86_64: can_probe())",
    errnos.EBUSY: "the location is busy: another tracer owns it (e.g. an ftrace user with IPMODIFY, such as livepatch)",
    errnos.EEXIST: "this probe is already registered",
    errnos.ENOMEM: "the kernel could not allocate the probe (or a kretprobe instance pool)",
    errnos.EOPNOTSUPP: "this kind of probe is not supported here (e.g. kretprobes without "
    "CONFIG_KRETPROBES, or a kretprobe not at function entry)",
    errnos.EPERM: "probing is not permitted (kernel lockdown or a disabled kprobes subsystem)",
}


def register_error(err: int, what: str, where: str) -> KbridgeError:
    """register_WHAT on WHERE failed with -ERR: its generic meaning."""
    name = errnos.errorcode.get(err, str(err))
    why = REGISTER_ERRORS.get(err, os.strerror(err))
    return KbridgeError(
        f"register_{what} on {where!r} failed with -{name}: {why}",
        "kbridge inspect SYMBOL shows how the kernel sees it",
    )


def explain_refusal(err: int, what: str, arch: Arch, symbol: str, offset: int, ftraceable: bool) -> KbridgeError:
    """register_WHAT's error on SYMBOL+OFFSET, with the cause the arch's facts point at."""
    where = f"{symbol}+{offset:#x}"
    site_at = arch.ftrace_site
    if err == errnos.EINVAL and not arch.kprobes_on_ftrace and ftraceable and site_at is not None and offset == site_at:
        return KbridgeError(
            f"register_{what} on {where!r} failed with -EINVAL: {where} is {symbol}'s ftrace call site "
            f"({arch.ftrace_site_text}), and "
            f"{arch.name} has no kprobes-on-ftrace, so check_ftrace_location() refuses it",
            f"probe {symbol}+0x0 or {symbol}+{site_at + arch.ftrace_site_len:#x} (the next instruction)",
        )
    if err == errnos.EINVAL and offset % arch.insn_align:
        lower = offset - offset % arch.insn_align
        return KbridgeError(
            f"register_{what} on {where!r} failed with -EINVAL: {arch.name} instructions are "
            f"{arch.insn_align} bytes, {offset:#x} is not a multiple of {arch.insn_align} (arch_prepare_kprobe)",
            f"use --offset {lower:#x} or {lower + arch.insn_align:#x}",
        )
    if err == errnos.EINVAL and arch.insn_rejects and offset:
        # Where the ftrace site has no fixed offset (32-bit arm: after the prologue, ksys_write+0xc
        # on 6.1) it may be that; an instruction the decoder rejects is -EINVAL as well.
        site = (
            f"{symbol}'s ftrace call site ({arch.ftrace_site_text}), which check_ftrace_location() refuses "
            f"({arch.name} has no kprobes-on-ftrace), or "
            if ftraceable and arch.ftrace_site is None and not arch.kprobes_on_ftrace
            else ""
        )
        return KbridgeError(
            f"register_{what} on {where!r} failed with -EINVAL: {where} is {site}an instruction {arch.name}'s "
            f"kprobes decoder rejects ({arch.insn_rejects}), unless it is blacklisted or outside the function",
            f"kbridge inspect {symbol} shows its first instructions; probe another one",
        )
    if err == errnos.EILSEQ and arch.decodes_insns:
        return KbridgeError(
            f"register_{what} on {where!r} failed with -EILSEQ: {offset:#x} is inside an instruction "
            "(can_probe() decodes the function from its start and found no instruction boundary there)",
            "kbridge inspect SYMBOL shows the instructions at the entry; pick an offset where one starts",
        )
    return register_error(err, what, where)
