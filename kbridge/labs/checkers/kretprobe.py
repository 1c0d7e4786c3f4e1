"""kretprobe: the student's kretprobe on ksys_write, against a workload whose return values are known."""

from __future__ import annotations

import errno
import secrets

from kbridge.labs import evidence
from kbridge.labs.checkers.common import build_and_load, check_registered, unload
from kbridge.labs.context import LabContext
from kbridge.labs.grading import CheckSpec, Grader
from kbridge.labs.guest import WORKLOAD, WORKLOAD_COMM, guest_run
from kbridge.labs.kmodule import LoadedModule, int_state

MODULE = "kretprobe_lab"
SYMBOL = "ksys_write"
# kblab write N: write() of 1, 2, ... N bytes to /dev/null, N drawn per run (the student's code cannot know it)
MIN_CALLS, MAX_CALLS = 15, 45
BLOCKERS = 4  # kblab block 4: four writes asleep in ksys_write at once
STATE = f"/sys/kernel/debug/{MODULE}/state"
KEYS = ("entries", "returns", "ret_sum", "mismatches", "min_ns", "max_ns", "nmissed", "maxactive")

CHECKS = [
    CheckSpec(
        "builds",
        "the module compiles against the guest kernel's headers",
        "fix the compiler errors shown, at the line they name",
    ),
    CheckSpec(
        "loads",
        "insmod succeeds and the module is in /proc/modules",
        "insmod runs your init function: it returns 0 once register_kretprobe(&rp) succeeded, and "
        "register_kretprobe()'s error otherwise, so that insmod fails with it (TODO 5)",
    ),
    CheckSpec(
        "registered",
        f"kprobes/list shows a return probe (r) at {SYMBOL}+0x0",
        f'.kp.symbol_name = "{SYMBOL}" and register_kretprobe(&rp) in init (TODO 1, 5)',
    ),
    CheckSpec(
        "entries",
        "the entry handler ran once per call of the workload (a number drawn per run), as many times as "
        "the checker's own kprobe on the same function",
        "count each call the entry handler keeps (return 0 for it), and attach it: .entry_handler",
    ),
    CheckSpec(
        "return-values",
        "the return handler saw every return value the kernel gave (N returns of 1..N bytes: sum N(N+1)/2)",
        "regs_return_value(regs) in the return handler is the function's return value; attach it with .handler",
    ),
    CheckSpec(
        "entry-data",
        "each return saw the byte count its own call was asked for at entry",
        "the count is ksys_write's 3rd argument, regs_get_kernel_argument(regs, 2) at entry; "
        "keep it in ri->data, sized by .data_size = sizeof(struct call_data)",
    ),
    CheckSpec(
        "duration",
        "each call's duration (return time - entry time) is positive and under 1 s",
        "keep ktime_get() at entry in ri->data and subtract it at return: a duration of "
        "seconds means the entry time was never stored",
    ),
    CheckSpec(
        "unloads",
        "rmmod works and leaves no return probe behind",
        "unregister_kretprobe(&rp) in the exit function (TODO 6)",
    ),
    CheckSpec(
        "nmissed",
        f"with maxactive=1 and {BLOCKERS} writes asleep in {SYMBOL} at once, "
        f"at least {BLOCKERS - 1} are missed (rp.nmissed)",
        "set rp.maxactive from the maxactive parameter before registering (TODO 5): each call "
        "in flight holds one instance, and a call finding none is only counted in nmissed",
    ),
]


def run(ctx: LabContext, g: Grader) -> None:
    lm = build_and_load(ctx, g, MODULE, registers="register_kretprobe")
    if lm is None:
        return
    entry = check_registered(ctx, g, "r", SYMBOL)
    calls = MIN_CALLS + secrets.randbelow(MAX_CALLS - MIN_CALLS + 1)
    ret_sum = calls * (calls + 1) // 2
    work = [WORKLOAD, "write", str(calls)]
    idle = int_state(ctx.target, STATE, KEYS)  # before any call: nothing to have counted yet
    count = evidence.CallCount(ctx.target, SYMBOL, WORKLOAD_COMM)
    ctx.cleanups.append(count.remove)
    if entry is not None:
        count.start()
    code, out = guest_run(ctx.target, work, ctx.log)
    counted = count.stop() if entry is not None else None
    count.remove()
    if code != 0:
        g.fail("entries", f"the workload {' '.join(work)} failed ({code}): {out}")
        return
    s = int_state(ctx.target, STATE, KEYS)
    early = [k for k in ("entries", "returns", "ret_sum") if idle[k]]
    if g.ready("entries", "registered"):
        g.result(
            "entries",
            s["entries"] == calls == counted and not early,
            f"{', '.join(early)} already set before the workload made any call: counts must come from the handlers"
            if early
            else f"entries = {s['entries']} for {calls} write() calls; the checker's own kprobe counted {counted}",
        )
    if g.ready("return-values", "registered"):
        g.result(
            "return-values",
            s["returns"] == calls and s["ret_sum"] == ret_sum and not early,
            f"returns = {s['returns']}, sum of return values = {s['ret_sum']} (want {calls} and {ret_sum})",
        )
    if g.ready("entry-data", "return-values"):
        g.result(
            "entry-data",
            s["mismatches"] == 0,
            f"{s['mismatches']} of {s['returns']} returns differ from the count asked at entry",
        )
    if g.ready("duration", "return-values"):
        g.result(
            "duration",
            0 < s["min_ns"] <= s["max_ns"] < 1_000_000_000,
            f"durations from {s['min_ns']} ns to {s['max_ns']} ns",
        )
    if not g.ready("unloads", "registered"):
        return
    unload(ctx, g, lm, MODULE, SYMBOL, "r", work)
    if not g.ready("nmissed", "unloads"):
        return
    assert ctx.module is not None and ctx.log is not None
    again = LoadedModule(ctx.target, ctx.module, ctx.log)
    ctx.cleanups.append(again.cleanup)
    ok, err, said = again.insmod("maxactive=1")
    if not ok:
        why = f"-{errno.errorcode.get(err, err)}" if err is not None else "no error code"
        g.fail("nmissed", f"insmod {MODULE}.ko maxactive=1 failed ({why}): " + "\n".join(said))
        return
    code, out = guest_run(ctx.target, [WORKLOAD, "block", str(BLOCKERS)], ctx.log, timeout=90)
    s = int_state(ctx.target, STATE, KEYS)
    again.rmmod()
    g.result(
        "nmissed",
        code == 0 and s["maxactive"] == 1 and s["nmissed"] >= BLOCKERS - 1,
        f"maxactive = {s['maxactive']}, nmissed = {s['nmissed']} after {BLOCKERS} writes blocked at once"
        + (f" (the workload failed: {code} {out})" if code else ""),
    )
