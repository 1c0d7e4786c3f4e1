"""kprobe-module: a kprobe on the write syscall's entry from the student's module."""

from __future__ import annotations

from kbridge import kprobes_list
from kbridge.arch import Arch
from kbridge.labs.checkers.common import build_and_load, probe_entry, probes_on, unload
from kbridge.labs.context import LabContext
from kbridge.labs.grading import CheckSpec, Grader
from kbridge.labs.guest import WORKLOAD, guest_run
from kbridge.labs.kmodule import read_state
from kbridge.mechanisms.singlestep import expected_ips

MODULE = "kprobe_lab"
CALLS = 25  # kblab write 25: exactly 25 write() calls
STATE = f"/sys/kernel/debug/{MODULE}/state"

CHECKS = [
    CheckSpec(
        "builds",
        "the module compiles against the guest kernel's headers",
        "fix the compiler errors shown, at the line they name; kernel code is C89-ish: "
        "declare variables at the top of a block",
    ),
    CheckSpec(
        "loads",
        "insmod succeeds and the module is in /proc/modules",
        "init must return 0; register_kprobe's error codes: -ENOENT no such symbol, "
        "-EINVAL not probeable (blacklisted, or not at an instruction boundary)",
    ),
    CheckSpec(
        "registered",
        "kprobes/list shows an armed kprobe at the write syscall's entry (+0x0)",
        "sys_write is a wrapper since Linux 4.17: __x64_sys_write on x86_64, __arm64_sys_write on "
        "arm64 (`kbridge vm exec -- grep sys_write /proc/kallsyms`); register it in init (TODO 1, 5)",
    ),
    CheckSpec(
        "pre-count",
        f"the pre-handler ran once per write() of the workload ({CALLS} calls)",
        "count every call in handler_pre (atomic_inc(&pre_count)) and attach it: .pre_handler",
    ),
    CheckSpec(
        "post-count",
        f"the post-handler ran once per write() of the workload ({CALLS} calls)",
        "count every call in handler_post and attach it: .post_handler (TODO 3, 4)",
    ),
    CheckSpec(
        "prints",
        "the kernel log has one line per handler call naming the real probe address",
        "print p->addr with %px, as kprobe_example.c prints it, in both handlers; %p prints a "
        "hashed pointer (since 4.15) that matches nothing",
    ),
    CheckSpec(
        "post-ip",
        "the ip seen by each handler is where the breakpoint and single-step leave it",
        "keep instruction_pointer(regs) in last_pre_ip / last_post_ip; x86_64 reports the ip after "
        "the int3 byte in the pre-handler (+1) and after the probed instruction in the post-handler "
        "(an ftrace-based probe emulates the 5-byte call: +5); arm64 reports the BRK's own address "
        "(+0) and the next instruction (+4)",
    ),
    CheckSpec(
        "unloads",
        "rmmod works and leaves no kprobe behind",
        "unregister_kprobe(&kp) in the exit function (TODO 6): a kprobe left behind calls handler "
        "code that was freed with the module",
    ),
]


def wrapper_symbol(arch: Arch) -> str:
    """The function write(2) enters the kernel through on ARCH."""
    return arch.syscall_entry("write")


def run(ctx: LabContext, g: Grader) -> None:
    symbol = wrapper_symbol(ctx.target.arch)
    work = [WORKLOAD, "write", str(CALLS)]
    before = set(probes_on(ctx, {symbol, "ksys_write", "sys_write"}))
    lm = build_and_load(ctx, g, MODULE)
    if lm is None:
        return
    assert ctx.log is not None
    entry = probe_entry(ctx, "k", symbol)
    if entry is None or "[DISABLED]" in entry[3] or "[GONE]" in entry[3]:
        added = [e for e in probes_on(ctx, {symbol, "ksys_write", "sys_write"}) if e not in before]
        seen = "; ".join(" ".join(e) for e in added) or "nothing new in kprobes/list"
        g.fail("registered", f"no armed kprobe at {symbol}+0x0 while {MODULE} is loaded ({seen})")
    else:
        g.result("registered", True, f"kprobes/list: {' '.join(entry)}")
    ctx.log.poll()
    mark = len(ctx.log.lines)
    code, out = guest_run(ctx.target, work, ctx.log)
    ctx.log.poll()
    lines = ctx.log.lines[mark:]
    if code != 0:
        g.fail("pre-count", f"the workload {' '.join(work)} failed ({code}): {out}")
        return
    state = read_state(ctx.target, STATE)
    pre, post = int(state.get("pre", "0")), int(state.get("post", "0"))
    # Counts only mean something for a probe the kernel shows registered: counters set by other
    # code (or text printed without a probe) must not pass.
    if g.ready("pre-count", "registered"):
        g.result("pre-count", pre == CALLS, f"pre_count = {pre}, the workload made {CALLS} write() calls")
    if g.ready("post-count", "registered"):
        g.result("post-count", post == CALLS, f"post_count = {post}, the workload made {CALLS} write() calls")
    if entry is None:
        g.ready("prints", "registered")
        g.ready("post-ip", "registered")
    else:
        addr = int(entry[0], 16)
        mine = [t for t in lines if t.startswith(f"{MODULE}: ")]
        naming = [t for t in mine if f"{addr:x}" in t.lower()]
        g.result(
            "prints",
            len(naming) == 2 * CALLS,
            f"{len(naming)} lines name the probe address {addr:#x} (want {2 * CALLS}: pre and post "
            f"for each of {CALLS} calls); {len(mine)} lines in all" + (f", e.g. {mine[0]!r}" if mine else ""),
        )
        want_pre, (lo, hi) = expected_ips(ctx.target.arch, kprobes_list.mode_of(" ".join(entry)))
        got_addr = int(state.get("addr", "0"), 16)
        pre_d = int(state.get("pre_ip", "0"), 16) - addr
        post_d = int(state.get("post_ip", "0"), 16) - addr
        mode = "ftrace" if "[FTRACE]" in entry[3] else "breakpoint"
        ok = got_addr == addr and pre_d == want_pre and lo <= post_d <= hi
        want_post = f"+{lo}" if lo == hi else f"+{lo}..+{hi}"
        g.result(
            "post-ip",
            ok,
            f"probe {addr:#x} ({mode}); module saw addr {got_addr:#x}, pre ip "
            f"{pre_d:+d}, post ip {post_d:+d} from it (want pre {want_pre:+d}, post {want_post})",
        )
    if g.ready("unloads", "registered"):
        unload(ctx, g, lm, MODULE, symbol, "k", work)
