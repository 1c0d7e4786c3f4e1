"""old-apis: on Linux 5.10, a kprobe whose fault_handler fires, and arguments read in a pre-handler
(what jprobes did before 4.15)."""

from __future__ import annotations

from kbridge.labs.checkers.common import LOADS, build_and_load, check_registered, unload
from kbridge.labs.context import LabContext
from kbridge.labs.grading import CheckSpec, Grader
from kbridge.labs.guest import WORKLOAD, guest_run
from kbridge.labs.kmodule import int_state

MODULE = "old_lab"
SYMBOL = "ksys_write"
CALLS = 20  # kblab write 20: fd 3, counts 1..20
COUNT_SUM = CALLS * (CALLS + 1) // 2
STATE = f"/sys/kernel/debug/{MODULE}/state"
KEYS = ("calls", "count_sum", "bad_fd", "faults", "last_trap", "nmissed")

CHECKS = [
    CheckSpec(
        "builds",
        "the module compiles against the 5.10 kernel's headers",
        "fix the compiler errors shown; on 5.14+ kernels .fault_handler does not exist any more "
        "(this lab runs on 5.10)",
    ),
    LOADS,
    CheckSpec(
        "registered",
        f"kprobes/list shows a kprobe at {SYMBOL}+0x0",
        f'.symbol_name = "{SYMBOL}" and register_kprobe(&kp) in init (TODO 1, 5)',
    ),
    CheckSpec(
        "arguments",
        f"the pre-handler read ksys_write's arguments: fd 3 and counts summing to {COUNT_SUM} over {CALLS} calls",
        "what a jprobe got as parameters a pre-handler reads from the registers: "
        "regs_get_kernel_argument(regs, 0) is the 1st argument, (regs, 2) the 3rd",
    ),
    CheckSpec(
        "fault-handler",
        f"the fault_handler ran for every call ({CALLS}), for a page fault "
        "(x86_64 5.10 calls it twice per fault: from the fault entry and again before the fixup)",
        "attach .fault_handler and make the pre-handler fault: copy_from_user_nofault() from user "
        "address 0; the kernel calls fault_handler before its own exception fixup",
    ),
    CheckSpec(
        "nmissed",
        "the kernel counted every faulting handler run in kp.nmissed",
        "kprobe_fault_handler() increments nmissed for a fault in a pre/post handler on 5.10, "
        "whatever the fault_handler returns: make the pre-handler fault on every call",
    ),
    CheckSpec(
        "unloads", "rmmod works and leaves no kprobe behind", "unregister_kprobe(&kp) in the exit function (TODO 6)"
    ),
]


def run(ctx: LabContext, g: Grader) -> None:
    lm = build_and_load(ctx, g, MODULE)
    if lm is None:
        return
    check_registered(ctx, g, "k", SYMBOL)
    work = [WORKLOAD, "write", str(CALLS)]
    code, out = guest_run(ctx.target, work, ctx.log)
    if code != 0:
        g.fail("arguments", f"the workload {' '.join(work)} failed ({code}): {out}")
        return
    s = int_state(ctx.target, STATE, KEYS)
    if not g.ready("arguments", "registered"):
        return
    g.result(
        "arguments",
        s["calls"] == CALLS and s["count_sum"] == COUNT_SUM and s["bad_fd"] == 0,
        f"{s['calls']} calls, counts summing to {s['count_sum']}, {s['bad_fd']} with an fd below 3 "
        f"(want {CALLS}, {COUNT_SUM}, 0)",
    )
    trap = s["last_trap"] & 0xFFFFFFFF
    arch = ctx.target.arch
    # x86_64 passes the trap vector (14, #PF); arm64 the ESR (exception class 0x25, a data abort).
    trap_ok = arch.is_data_fault(trap)
    what = f"{arch.describe_trap(trap)}; want a data access fault"
    g.result(
        "fault-handler",
        s["faults"] >= CALLS and s["faults"] % CALLS == 0 and trap_ok,
        f"fault_handler ran {s['faults']} times for {CALLS} calls; last trapnr {trap:#x} ({what})",
    )
    g.result(
        "nmissed",
        s["nmissed"] >= CALLS,
        f"kp.nmissed = {s['nmissed']} after {CALLS} faulting calls ({s['faults']} fault_handler calls)",
    )
    if g.ready("unloads", "registered"):
        unload(ctx, g, lm, MODULE, SYMBOL, "k", work)
