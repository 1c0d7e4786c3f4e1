"""What a student's failure means: a compiler error, a failed insmod, a crash, named by its cause.

Each classic mistake of a first kernel module is recognised from what the kernel and the compiler
really said (and where), and explained in one sentence a student can act on:

- a pre-handler returning non-zero: the kernel then skips the probed instruction (it takes the
  return value to mean "I changed the instruction pointer myself"). x86_64 resumes after the int3
  byte, at SYMBOL+0x1, inside an instruction, and crashes there; arm64 returns to the BRK at
  SYMBOL+0x0, traps again, forever (a soft lockup);
- a handler that sleeps ("BUG: scheduling while atomic", "sleeping function called from invalid
  context"): handlers run with preemption disabled;
- a module without MODULE_LICENSE: 6.1's modpost refuses it, and the kprobe API is exported to GPL
  modules only (EXPORT_SYMBOL_GPL: an older kernel loads it, then cannot link register_kprobe);
- register_kprobe()'s error returned by init: its errno decoded, the symbol named, and the TODO
  that sets it.
"""

from __future__ import annotations

import errno as errnos
import os
import re
from typing import TYPE_CHECKING

from kbridge import oops
from kbridge.arch import Arch
from kbridge.labs.grading import StudentCrash
from kbridge.labs.kmodule import crash_detail

if TYPE_CHECKING:
    from kbridge.labs.context import LabContext

# Functions a handler may reach that sleep (the frame below the student's own in the trace).
_SLEEP_MARKERS = ("BUG: scheduling while atomic", "BUG: sleeping function called from invalid context")
_SYMBOL_NAME = re.compile(r'\.symbol_name\s*=\s*"([^"]*)"')
_TODO = re.compile(r"TODO (\d+)")


def diagnose(crash: StudentCrash, ctx: LabContext) -> tuple[str, str | None]:
    """The failed check's detail for CRASH (the cause first when it is a known mistake, then the
    kernel's text led by the student's line), and the hint for it (None: the generic one)."""
    detail = crash_detail(crash, ctx.module)
    module = ctx.module.name if ctx.module is not None else None
    if (found := recognise(crash.text, ctx.target.arch, ctx.probes, module)) is not None:
        cause, hint = found
        return f"{cause}\n{detail}", hint
    return detail, None


def recognise(text: str, arch: Arch, probes: list[tuple[str, int]], module: str | None) -> tuple[str, str] | None:
    """(cause, hint) when crash report TEXT is a classic mistake: in an ARCH guest, with the
    student's PROBES ((symbol, offset) pairs) and their MODULE's name (None: no module)."""
    return _pre_handler_nonzero(text, arch, probes) or _sleeps(text, module)


def _pre_handler_nonzero(text: str, arch: Arch, probes: list[tuple[str, int]]) -> tuple[str, str] | None:
    """The crash or lockup a pre-handler returning non-zero leaves at the probe: the kernel resumes
    where the trap left the instruction pointer (arch.pre_ip_offset past the probe)."""
    site = oops.faulting_site(text)
    if site is None or site.module is not None:
        return None
    bp = arch.breakpoint_name.split(" (")[0]
    for symbol, offset in probes:
        if site.function != symbol:
            continue
        resume = offset + arch.pre_ip_offset
        if arch.pre_ip_offset and resume <= site.offset < offset + arch.insn_lengths[1]:
            # The bytes from there on are the rest of the probed instruction, read as code: where it
            # crashes depends on them (ftrace's call holds its trampoline's address: it varies by boot).
            at = "" if site.offset == resume else f" (at {symbol}+{site.offset:#x})"
            where = (
                f"the kernel resumed at {symbol}+{resume:#x}, right after the {bp}, in the middle "
                f"of an instruction, and crashed there{at}"
            )
        elif not arch.pre_ip_offset and site.offset == offset:
            where = f"the kernel returned to the {bp} at {symbol}+{offset:#x}, which trapped again, forever"
        else:
            continue
        return (
            "your pre_handler returned non-zero: the kernel then skips the probed instruction (non-zero "
            f"means the handler changed the instruction pointer itself); {where}",
            "return 0 from the pre-handler: only a handler that sets the instruction pointer itself "
            "(regs->ip / regs->pc) returns 1",
        )
    return None


def _sleeps(text: str, module: str | None) -> tuple[str, str] | None:
    """A handler that called something that sleeps."""
    if module is None or not any(m in text for m in _SLEEP_MARKERS):
        return None
    frames = list(oops.SITE.finditer(text))
    mine = next((i for i, m in enumerate(frames) if m["mod"] == module), None)
    if mine is None:
        return None
    handler = frames[mine]["func"]
    called = frames[mine - 1]["func"] if mine > 0 else "a function that sleeps"
    return (
        f"your handler sleeps: {handler}() called {called}(), which sleeps; a kprobe handler runs "
        "with preemption disabled (atomic context), where nothing may sleep",
        "no msleep(), mutex_lock(), kmalloc(GFP_KERNEL), copy_from_user() or anything that may wait "
        "in a handler: count and record there, do slow work elsewhere (mdelay() busy-waits, if you must)",
    )


def build_hint(message: str) -> str | None:
    """A hint for what gcc or modpost said, when it names a known mistake (None: the lab's own hint)."""
    if "missing MODULE_LICENSE" in message:
        return (
            'add MODULE_LICENSE("GPL"); at the end of the file: modpost refuses a module without one, '
            "and the kprobe API is exported to GPL modules only"
        )
    if m := re.search(
        r"['‘]([^'’]+)['’] has no member named ['‘]([^'’]+)['’](?:; did you mean ['‘]([^'’]+)['’])?", message
    ):
        mean = f" (gcc suggests '{m[3]}')" if m[3] else ""
        return (
            f"{m[1]} has no member '{m[2]}'{mean}: check the spelling against its definition "
            "(struct kprobe and struct kretprobe are in include/linux/kprobes.h)"
        )
    if "implicit declaration of function" in message:
        return "a function used before it is declared: include its header, or check the name's spelling"
    if "ISO C90 forbids mixed declarations and code" in message:
        return "kernel code is built as C89 here: declare variables at the top of a block, before statements"
    if m := re.search(r"['‘]([A-Za-z_]\w*)['’] undeclared", message):
        return f"'{m[1]}' is not declared: check its spelling, or declare it before use"
    return None


def load_failure(
    err: int | None, said: list[str], source: str, fname: str, registers: str, symbols: set[str] | None = None
) -> tuple[str, str | None]:
    """Why insmod failed, from the errno it returned and what the kernel logged (SAID): (detail, hint).

    REGISTERS names the register call of the lab (register_kprobe); SOURCE is the student's file,
    read for the symbol it asks for and the TODO that sets it; SYMBOLS (if known) the kernel's symbols.
    """
    log = "\n".join(f"  {line}" for line in _dedup(said)) or "  (the kernel logged nothing)"
    unknown = [m[1] for line in said if (m := re.search(r"Unknown symbol (\S+)", line))]
    if err is None:
        return f"insmod failed, with no error code\nkernel log:\n{log}", None
    ename = errnos.errorcode.get(err, f"errno {err}")
    if err == errnos.ENOENT and unknown:
        gpl = "MODULE_LICENSE" not in source
        why = (
            f"the module uses {', '.join(unknown)}, which the kernel exports to GPL modules only, "
            "and it declares no MODULE_LICENSE"
            if gpl
            else f"the module uses {', '.join(unknown)}, which this kernel does not export"
        )
        hint = 'add MODULE_LICENSE("GPL");' if gpl else "check the name's spelling: /proc/kallsyms lists the kernel's"
        return f"insmod failed: -ENOENT: {why}\nkernel log:\n{log}", hint
    head = f"insmod failed: your init function returned -{ename} ({os.strerror(err)})"
    symbol, line, todo = _symbol_name(source)
    at = f" ({fname}:{line}{f', TODO {todo}' if todo else ''})" if line else ""
    if err == errnos.ENOENT:
        if symbol is not None and (symbols is None or symbol not in symbols):
            why = f"{registers}() found no symbol {symbol!r} in this kernel{at}"
        else:
            why = f"{registers}() found no such symbol{at}"
        hint = (
            "the .symbol_name you gave does not exist in this kernel: see which it has with "
            "`kbridge vm exec -- /bin/busybox grep sys_write /proc/kallsyms`"
        )
        return f"{head}: {why}\nkernel log:\n{log}", hint
    if err in (errnos.EINVAL, errnos.EILSEQ):
        what = repr(symbol) if symbol else "the address"
        why = (
            f"{registers}() refused {what}{at}: it cannot be probed (on the kprobe blacklist, or not "
            "at an instruction boundary)"
        )
        return (
            f"{head}: {why}\nkernel log:\n{log}",
            "probe a function's entry (+0): /sys/kernel/debug/kprobes/blacklist",
        )
    return f"{head}\nkernel log:\n{log}", None


def _symbol_name(source: str) -> tuple[str | None, int | None, int | None]:
    """The first .symbol_name = "..." in SOURCE: (the name, its line, the TODO it sits under)."""
    todo = None
    for n, line in enumerate(source.splitlines(), 1):
        if m := _TODO.search(line):
            todo = int(m[1])
        if m := _SYMBOL_NAME.search(line):
            return m[1], n, todo
    return None, None, None


def _dedup(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line not in out:
            out.append(line)
    return out


def flood(lines: int, calls: int) -> str | None:
    """What a handler printing far more than once per call of the workload did (None: it did not)."""
    if lines <= max(4 * calls, calls + 20):
        return None
    return (
        f"your handlers printed {lines} lines while the workload made {calls} calls: a handler runs for "
        "every call on the whole machine, and a printk in it without the wanted() filter floods the log "
        "(each line is then written out by a write(), which fires the probe again)"
    )
