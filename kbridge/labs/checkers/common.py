"""Steps several module labs share: build, load, find the probe in kprobes/list, unload."""

from __future__ import annotations

from kbridge.errors import KbridgeError
from kbridge.labs.context import LabContext
from kbridge.labs.grading import Grader
from kbridge.labs.kmodule import LoadedModule, build_student_module, kprobes_list, loaded_modules


def build_and_load(ctx: LabContext, g: Grader, name: str, params: tuple[str, ...] = ()) -> LoadedModule | None:
    """The 'builds' and 'loads' checks; the loaded module, or None when either failed."""
    src = f"{name}.c"
    try:
        ctx.module = build_student_module(name, ctx.files[src], ctx.student_path(src), ctx.target.image,
                                          ctx.workdir)
    except KbridgeError as e:
        g.fail("builds", e.message)
        return None
    g.result("builds", True, "\n".join(ctx.module.warnings[:10]) or f"{src} compiled for {ctx.target.krel}")
    assert ctx.log is not None
    lm = LoadedModule(ctx.target, ctx.module, ctx.log)
    ctx.cleanups.append(lm.cleanup)
    ok, said = lm.insmod(*params)
    in_modules = name in loaded_modules(ctx.target)
    if not ok:
        g.fail("loads", f"insmod {name}.ko failed:\n{said}")
        return None
    g.result("loads", in_modules, f"insmod {name}.ko: loaded, listed in /proc/modules" if in_modules
             else f"insmod returned 0 but {name} is not in /proc/modules")
    return lm if in_modules else None


def probe_entry(ctx: LabContext, kind: str, symbol: str, offset: int = 0) -> tuple[str, str, str, str] | None:
    """The kprobes/list line of a probe of KIND (k: kprobe, r: kretprobe) at SYMBOL+OFFSET."""
    want = f"{symbol}+{offset:#x}"
    for entry in kprobes_list(ctx.target):
        if entry[1] == kind and entry[2] == want:
            return entry
    return None


def probes_on(ctx: LabContext, symbols: set[str]) -> list[tuple[str, str, str, str]]:
    return [e for e in kprobes_list(ctx.target) if e[2].split("+", 1)[0] in symbols]


def unload(ctx: LabContext, g: Grader, lm: LoadedModule, name: str, symbol: str, kind: str,
           workload: list[str]) -> None:
    """The 'unloads' check: rmmod works, the probe leaves kprobes/list, and the next call of the
    probed function does not run freed handler code (that oopses: StudentCrash)."""
    from kbridge.labs.guest import guest_run

    ok, out = lm.rmmod()
    if not ok:
        g.fail("unloads", f"rmmod {name} failed: {out}")
        return
    left = [e for e in kprobes_list(ctx.target) if e[2].split("+", 1)[0] == symbol and e[1] == kind]
    guest_run(ctx.target, workload, ctx.log)  # a probe left behind would call the unloaded handlers
    if left:
        g.fail("unloads", "after rmmod, kprobes/list still has: " + "  ".join(e[0] + " " + e[2] for e in left))
        return
    still = name in loaded_modules(ctx.target)
    g.result("unloads", not still, f"rmmod {name}: gone from /proc/modules and from kprobes/list"
             if not still else f"{name} is still in /proc/modules")
