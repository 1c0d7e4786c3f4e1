"""Steps several module labs share: build, load, find the probe in kprobes/list, unload."""

from __future__ import annotations

from kbridge.errors import KbridgeError
from kbridge.labs.context import LabContext
from kbridge.labs.diagnose import build_hint, load_failure
from kbridge.labs.grading import CheckSpec, Grader
from kbridge.labs.kmodule import LoadedModule, build_student_module, imports, kprobes_list, loaded_modules

LOADS = CheckSpec(
    "loads",
    "insmod succeeds and the module is in /proc/modules",
    "insmod runs your init function: it returns 0 once register_kprobe(&kp) succeeded, and register_kprobe()'s "
    "error otherwise, so that insmod fails with it (TODO 5)",
)


def build_and_load(
    ctx: LabContext, g: Grader, name: str, params: tuple[str, ...] = (), registers: str = "register_kprobe"
) -> LoadedModule | None:
    """The 'builds' and 'loads' checks; the loaded module, or None when either failed. REGISTERS is the
    call the lab's init makes, named when insmod fails with its error."""
    src = f"{name}.c"
    try:
        ctx.module = build_student_module(name, ctx.files[src], ctx.directory, ctx.target.image)
    except KbridgeError as e:
        g.fail("builds", e.message, build_hint(e.message))
        return None
    g.result("builds", True, "\n".join(ctx.module.warnings[:10]) or f"{src} compiled for {ctx.target.krel}")
    assert ctx.log is not None
    lm = LoadedModule(ctx.target, ctx.module, ctx.log)
    ctx.cleanups.append(lm.cleanup)
    ok, err, said = lm.insmod(*params)
    if not ok:
        names = set(ctx.session.symbols.entries) if err is not None else None
        detail, hint = load_failure(err, _quiet(said), ctx.files[src], src, registers, names)
        g.fail("loads", detail, hint)
        return None
    in_modules = name in loaded_modules(ctx.target)
    g.result(
        "loads",
        in_modules,
        f"insmod {name}.ko: loaded, listed in /proc/modules"
        if in_modules
        else f"insmod returned 0 but {name} is not in /proc/modules",
    )
    return lm if in_modules else None


def _quiet(said: list[str]) -> list[str]:
    """The module's own lines, without the kernel's notes on every out-of-tree module."""
    return [s for s in said if "taints kernel" not in s and "module verification failed" not in s]


def probe_entry(ctx: LabContext, kind: str, symbol: str, offset: int = 0) -> tuple[str, str, str, str] | None:
    """The kprobes/list line of a probe of KIND (k: kprobe, r: kretprobe) at SYMBOL+OFFSET."""
    want = f"{symbol}+{offset:#x}"
    for entry in kprobes_list(ctx.target):
        if entry[1] == kind and entry[2] == want:
            return entry
    return None


def check_registered(ctx: LabContext, g: Grader, kind: str, symbol: str) -> tuple[str, str, str, str] | None:
    """The 'registered' check: an enabled probe of KIND at SYMBOL+0x0 in kprobes/list; its line."""
    entry = probe_entry(ctx, kind, symbol)
    what = "return probe" if kind == "r" else "kprobe"
    g.result(
        "registered",
        entry is not None and "[DISABLED]" not in entry[3],
        f"kprobes/list: {' '.join(entry)}" if entry else f"no {what} at {symbol}+0x0 in kprobes/list",
    )
    return entry


def probes_on(ctx: LabContext, symbols: set[str]) -> list[tuple[str, str, str, str]]:
    return [e for e in kprobes_list(ctx.target) if e[2].split("+", 1)[0] in symbols]


KPROBES_ENABLED = "/sys/kernel/debug/kprobes/enabled"
UNREGISTER = {"k": ("unregister_kprobe", "unregister_kprobes"), "r": ("unregister_kretprobe", "unregister_kretprobes")}


def unload(
    ctx: LabContext, g: Grader, lm: LoadedModule, name: str, symbol: str, kind: str, workload: list[str]
) -> None:
    """The 'unloads' check: rmmod works and the probe leaves kprobes/list.

    Every kprobe is disarmed (debugfs kprobes/enabled = 0) while the module goes: a probe its
    exit function forgot to unregister would otherwise run handler code freed with the module at
    its next hit, and the guest's own helpers write() all the time, so the guest would die
    before the checker could say why. Such a probe fails the check, and the guest, which still
    holds it, is restarted.
    """
    from kbridge.labs.guest import guest_run

    t = ctx.target
    unregister = UNREGISTER[kind]
    if ctx.module is not None and not imports(ctx.module) & set(unregister):
        # rmmod would leave the probe registered with its handlers freed: the next hit crashes the
        # kernel, and reading kprobes/list touches the freed probe too. Say so without doing it.
        ctx.restart = True
        g.fail(
            "unloads",
            f"{name}.ko never calls {unregister[0]}(): after rmmod its probe on {symbol} "
            "would stay registered and run handler code freed with the module, crashing the kernel "
            "at its next hit. Not unloaded; the VM is restarted.",
        )
        return
    t.write_file(KPROBES_ENABLED, b"0")
    rearm = True
    try:
        ok, out = lm.rmmod()
        if not ok:
            g.fail("unloads", f"rmmod {name} failed: {out}")
            return
        # Read by a process of its own: the entry of a forgotten probe lives in freed module memory.
        code, listing = guest_run(t, ["/bin/busybox", "cat", "/sys/kernel/debug/kprobes/list"], ctx.log)
        left = [
            ln.strip()
            for ln in listing.splitlines()
            if len(ln.split()) >= 3 and ln.split()[1] == kind and ln.split()[2].split("+", 1)[0] == symbol
        ]
        if left or code != 0:
            rearm = False
            ctx.restart = True
            g.fail(
                "unloads",
                f"after rmmod {name}, the kprobe is still registered: "
                + ("  ".join(left) or listing.strip()[-300:])
                + "\nits handlers were freed with the module: the next hit would crash the kernel "
                "(kprobes were disarmed for this check; the VM is restarted)",
            )
            return
    finally:
        if rearm:
            t.write_file(KPROBES_ENABLED, b"1")
    guest_run(t, workload, ctx.log)  # the probed function runs again, unprobed, without harm
    still = name in loaded_modules(t)
    g.result(
        "unloads",
        not still,
        f"rmmod {name}: gone from /proc/modules and from kprobes/list"
        if not still
        else f"{name} is still in /proc/modules",
    )
