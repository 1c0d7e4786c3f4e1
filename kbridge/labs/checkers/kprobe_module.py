"""kprobe-module: a kprobe on the write syscall's entry from the student's module."""

from __future__ import annotations

import secrets
from collections import Counter

from kbridge import kprobes_list
from kbridge.arch import Arch
from kbridge.labs import ablation, evidence
from kbridge.labs.checkers.common import LOADS, build_and_load, probes_on, unload
from kbridge.labs.context import LabContext
from kbridge.labs.diagnose import flood
from kbridge.labs.grading import CheckSpec, Grader
from kbridge.labs.guest import WORKLOAD, WORKLOAD_COMM, guest_run
from kbridge.labs.kmodule import read_state
from kbridge.mechanisms.singlestep import expected_ips

MODULE = "kprobe_lab"
# kblab write N: exactly N write() calls, N drawn per run: a count the student's code cannot know
MIN_CALLS, MAX_CALLS = 11, 49
STATE = f"/sys/kernel/debug/{MODULE}/state"

CHECKS = [
    CheckSpec(
        "builds",
        "the module compiles against the guest kernel's headers",
        "fix the first error shown, at the line it names (the errors after it often follow from it)",
    ),
    LOADS,
    CheckSpec(
        "registered",
        "kprobes/list shows an armed kprobe at the write syscall's entry (+0x0)",
        "sys_write is a wrapper since Linux 4.17: __x64_sys_write on x86_64, __arm64_sys_write on "
        "arm64 (`kbridge vm exec -- grep sys_write /proc/kallsyms`); register it in init (TODO 1, 5)",
    ),
    CheckSpec(
        "pre-count",
        "the pre-handler ran once per write() of the workload (a number of calls drawn for each run), "
        "as many times as the checker's own kprobe on the same symbol",
        "count every call in handler_pre (atomic_inc(&pre_count)) and attach it: .pre_handler",
    ),
    CheckSpec(
        "post-count",
        "the post-handler ran once per write() of the workload, as many times as the checker's own kprobe; "
        "and post_count stays still while the checker's own module detaches the post handler for a second "
        "workload (the pre-handler still runs)",
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
        "the address and ips the handlers kept at each hit: the live probe address, and where the "
        "breakpoint and the single-step leave the ip",
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


def pick_calls() -> int:
    """How many write() calls the workload makes this run: a number the student's code cannot know."""
    return MIN_CALLS + secrets.randbelow(MAX_CALLS - MIN_CALLS + 1)


def _state(ctx: LabContext) -> dict[str, int]:
    raw = read_state(ctx.target, STATE)
    out = {}
    for key in ("pre", "post", "addr", "pre_ip", "post_ip"):
        try:
            out[key] = int(raw.get(key, "0"), 10 if key in ("pre", "post") else 16)
        except ValueError:
            out[key] = 0
    return out


def _new_entries(ctx: LabContext, symbol: str, before: Counter) -> list[tuple[str, str, str, str]]:
    now = Counter(probes_on(ctx, {symbol, "ksys_write", "sys_write"}))
    return list((now - before).elements())


def run(ctx: LabContext, g: Grader) -> None:
    t = ctx.target
    symbol = wrapper_symbol(t.arch)
    calls = pick_calls()
    work = [WORKLOAD, "write", str(calls)]
    before = Counter(probes_on(ctx, {symbol, "ksys_write", "sys_write"}))
    lm = build_and_load(ctx, g, MODULE)
    if lm is None:
        return
    assert ctx.log is not None
    added = _new_entries(ctx, symbol, before)
    entry = next((e for e in added if e[1] == "k" and e[2] == f"{symbol}+0x0" and "[DISABLED]" not in e[3]), None)
    if entry is None:
        seen = "; ".join(" ".join(e) for e in added) or "nothing new in kprobes/list"
        g.fail("registered", f"no armed kprobe at {symbol}+0x0 while {MODULE} is loaded ({seen})")
    else:
        ctx.probes.append((symbol, 0))
        g.result("registered", True, f"kprobes/list: {' '.join(entry)}")
    ctx.log.poll()
    idle = _state(ctx)  # before the workload made any call: a handler has had nothing to count yet
    mark = len(ctx.log.lines)
    count = evidence.CallCount(t, symbol, WORKLOAD_COMM)
    ctx.cleanups.append(count.remove)
    if entry is not None:
        count.start()  # the checker's own kprobe on the same symbol, counting the same calls
    code, out = guest_run(t, work, ctx.log)
    counted = count.stop() if entry is not None else None
    count.remove()
    ctx.log.poll()
    lines = ctx.log.lines[mark:]
    if code != 0:
        g.fail("pre-count", f"the workload {' '.join(work)} failed ({code}): {out}")
        return
    s = _state(ctx)
    # Counts only mean something for a probe the kernel shows registered: counters set by other
    # code (or text printed without a probe) must not pass.
    mine = [ln for ln in lines if ln.startswith(f"{MODULE}: ")]
    flooded = flood(len(mine), calls)
    if g.ready("pre-count", "registered"):
        g.result("pre-count", *_count("pre", idle["pre"], s["pre"], calls, counted, flooded))
    if g.ready("post-count", "registered"):
        assert entry is not None
        ok, detail = _count("post", idle["post"], s["post"], calls, counted, flooded)
        if not ok:
            g.fail("post-count", detail)
        else:
            _post_detached(ctx, g, int(entry[0], 16), detail)
    if entry is None:
        g.ready("prints", "registered")
        g.ready("post-ip", "registered")
    else:
        addr = int(entry[0], 16)
        live = evidence.live_address(t, symbol)
        naming = [ln for ln in mine if f"{addr:x}" in ln.lower()]
        g.result(
            "prints",
            len(naming) == 2 * calls,
            f"{len(naming)} lines name the probe address {addr:#x} (want {2 * calls}: pre and post for each "
            f"of the {calls} calls); {len(mine)} lines in all"
            + (f", e.g. {mine[0]}" if mine else "")
            + (f"\n{flooded}" if flooded else ""),
        )
        g.result("post-ip", *_ips(ctx, entry, addr, live, idle, s))
    if g.ready("unloads", "registered"):
        unload(ctx, g, lm, MODULE, symbol, "k", work)


def _count(key: str, idle: int, got: int, calls: int, counted: int | None, flooded: str | None) -> tuple[bool, str]:
    """Whether the handler counted exactly the calls the checker's own probe counted, and what was seen."""
    name = f"{key}_count"
    if idle:
        return False, (
            f"{name} was already {idle} before the workload made any call: the count must come from "
            f"the handler, one per call (it was {got} after {calls} calls)"
        )
    theirs = f"; the checker's own kprobe on the same symbol counted {counted}" if counted is not None else ""
    ok = got == calls and counted == calls
    detail = f"{name} = {got}, the workload made {calls} write() calls{theirs}"
    if counted is not None and counted != calls:
        detail += " (the calls did not all reach the probed function: the check is not trusted)"
    return ok, detail + (f"\n{flooded}" if flooded and got > calls else "")


DETACHED_HINT = (
    "count post_count in handler_post only, and attach it as .post_handler (TODO 3, 4): the post-handler "
    "runs after the probed instruction, so its count is the proof that the instruction ran; a count made "
    "in the pre-handler says nothing about that"
)


def _post_detached(ctx: LabContext, g: Grader, addr: int, counted: str) -> None:
    """The rest of 'post-count': a second workload while the checker's module holds the student's post
    handlers detached; post_count must not move (COUNTED: what the first workload showed)."""
    calls = pick_calls()
    try:
        d = ablation.detached_run(
            ctx, addr, MODULE, WORKLOAD_COMM, [WORKLOAD, "write", str(calls)], lambda: _state(ctx)
        )
    except ablation.AblationError as e:
        g.fail("post-count", f"{counted}; then {e.message}: the post count is not proven")
        return
    ok, detail = detached_verdict(d, addr, calls)
    if ok:
        g.result("post-count", True, f"{counted}; {detail}")
    else:
        g.fail("post-count", f"{counted}; {detail}", DETACHED_HINT)


def detached_verdict(d: ablation.Detached, addr: int, calls: int) -> tuple[bool, str]:
    """Whether post_count stood still while the student's post handlers were detached for CALLS more
    write() calls, and what was seen (one line, for the student)."""
    module = f"the checker's module {ablation.NAME}"
    if d.addr != addr:
        return False, f"then {module} put its kprobe at {d.addr:#x}, not at your probe's {addr:#x}: not checked"
    if not d.owned:
        return False, f"then {module} found no kprobe of {MODULE} at {addr:#x} ({d.others} others): not checked"
    if d.undetached:
        return False, f"then {module} found {d.owned} kprobes of {MODULE} at {addr:#x}, too many to detach: not checked"
    pre = d.after.get("pre", 0) - d.before.get("pre", 0)
    post = d.after.get("post", 0) - d.before.get("post", 0)
    moved = f"pre_count {pre:+d}, post_count {post:+d}"
    hits = f"{calls} more write() calls (its own kprobe at {addr:#x} counted {d.hits})"
    if not d.detached:
        pres = ", ".join(p for p, _ in d.handlers)
        return False, (
            f"your kprobe at {addr:#x} (pre-handler {pres}) has no post-handler attached: post_count is not counted "
            f"by one; with {module} loaded for {hits}: {moved}"
        )
    posts = ", ".join(q for _, q in d.handlers if q != "none")
    done = f"then {module} detached your post-handler {posts} (a no-op in its place) for {hits}: {moved}"
    if d.hits != calls:
        return False, f"{done} (the calls did not all reach the probe: the check is not trusted)"
    if post:
        return False, (
            f"{done}: post_count moved while no post-handler of yours ran, so the post-handler does not count "
            "it (the pre-handler, or other code, does)"
        )
    return True, f"{done}, as it must with no post-handler running"


def _ips(
    ctx: LabContext, entry: tuple[str, str, str, str], addr: int, live: int | None, idle: dict, s: dict
) -> tuple[bool, str]:
    """Whether the addresses the handlers kept are the live probe address and where the trap and the
    single-step leave the instruction pointer, seen during the workload (not set beforehand)."""
    # The address may be kept at registration (kp.addr); the ips only a hit can give.
    early = [k for k in ("pre_ip", "post_ip") if idle[k]]
    if early:
        return False, (
            f"the module reported {', '.join(early)} before the workload made any call: the handlers "
            "must keep what they see at each hit"
        )
    want_pre, (lo, hi) = expected_ips(ctx.target.arch, kprobes_list.mode_of(" ".join(entry)))
    pre_d, post_d = s["pre_ip"] - addr, s["post_ip"] - addr
    mode = "ftrace" if "[FTRACE]" in entry[3] else "breakpoint"
    want_post = f"+{lo}" if lo == hi else f"+{lo}..+{hi}"
    ok = s["addr"] == addr == live and pre_d == want_pre and lo <= post_d <= hi
    where = f"{live:#x}" if live is not None else "unknown"
    return ok, (
        f"probe {addr:#x} ({mode}; the symbol is at {where} in this boot); module saw addr {s['addr']:#x}, "
        f"pre ip {pre_d:+d}, post ip {post_d:+d} from it (want pre {want_pre:+d}, post {want_post})"
    )
