"""A ProbeSpec as the eBPF loader's command line: nothing is compiled per probe.

kbridge's one CO-RE object (kbridge/guest/bpf/probe.bpf.c) serves every probe: the symbol and
offset are given when the loader attaches, the filters and the registers to read are written
into the object's .rodata before it is loaded (the verifier then drops the branches a probe
does not use). The same ProbeSpec as the module: kprobe (pre) and kretprobe (entry, ret),
arguments by position, pid, tid and comm filters, kbridge's own guest helpers excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.spec import ProbeSpec

HANDLERS = ("pre", "post", "entry", "ret")  # the record's handler ids (kb_event.h)


def check(spec: ProbeSpec, arch: Arch) -> None:
    """What eBPF cannot do for SPEC, said before any VM boots."""
    if not arch.bpf_target:
        raise KbridgeError(
            f"kbridge's eBPF probe is built for x86_64 and arm64, not {arch.name}",
            f"on {arch.name} use --via kmod or --via tracefs",
        )
    if "post" in spec.handlers:
        raise KbridgeError(
            "eBPF kprobes have no post handler (BPF programs run before the probed instruction)",
            "use --pre with --via bpf, or --via kmod for --post",
        )
    limit = arch.max_args_of(spec.symbol)
    if bad := [a for a in spec.args if a.index > limit]:
        kind = "a syscall" if arch.is_syscall_wrapper(spec.symbol) else "a function"
        raise KbridgeError(
            f"{spec.symbol} is {kind}: it has at most {limit} register arguments, "
            f"not --arg {bad[0].name}={bad[0].index}"
        )


@dataclass(frozen=True)
class LoaderPlan:
    """How the loader is told to plant SPEC: its options, and what they set."""

    spec: ProbeSpec
    options: tuple[str, ...]  # everything after the object's path, but the per-run ones
    registers: tuple[str, ...]  # the pt_regs field each --arg is read from, in --arg order
    syscall: bool  # the arguments come from the user pt_regs a syscall wrapper receives

    def argv(
        self, loader: str, obj: str, btf: str | None, exclude: list[int], out: str, run_id: str, func_ip: bool | None
    ) -> list[str]:
        """The loader's argv for one run: this plan, plus where its output goes and whom it ignores."""
        argv = [loader, obj, *self.options, "--out", out, "--run", run_id]
        if exclude:
            argv += ["--exclude", ",".join(str(p) for p in exclude)]
        if btf:
            argv += ["--btf", btf]
        if func_ip is not None:
            argv += ["--func-ip", "1" if func_ip else "0"]
        return argv


def plan(spec: ProbeSpec, arch: Arch) -> LoaderPlan:
    """The loader options for SPEC on ARCH (SPEC's symbol already resolved)."""
    check(spec, arch)
    syscall = arch.is_syscall_wrapper(spec.symbol)
    fields = arch.syscall_arg_fields if syscall else arch.c_arg_fields
    registers = tuple(fields[a.index - 1] for a in spec.args)
    opts: list[str] = []
    if spec.kprobe:
        opts += ["--kprobe", f"{spec.symbol}+{spec.offset:#x}"]
    if spec.kretprobe:
        emit = [h for h in ("entry", "ret") if h in spec.handlers]
        opts += ["--kretprobe", spec.symbol, "--emit", ",".join(emit)]
        if spec.maxactive:
            opts += ["--maxactive", str(spec.maxactive)]
    if registers:
        opts += ["--regs", ",".join(str(arch.bpf_registers.index(r)) for r in registers)]
    if syscall:
        opts.append("--syscall")
    if spec.pid:
        opts += ["--pid", str(spec.pid)]
    if spec.tid:
        opts += ["--tid", str(spec.tid)]
    if spec.comm:
        opts += ["--comm", spec.comm]  # make_spec: 1-15 printable characters; an argv item, never shell text
    return LoaderPlan(spec, tuple(opts), registers, syscall)


def has_func_ip(krel: str) -> bool | None:
    """Whether kprobe programs may call bpf_get_func_ip (5.15, commit 9ffd9f3ff719) on kernel KREL;
    None when the release does not say (the loader then asks the kernel)."""
    parts = krel.split(".", 2)
    try:
        major, minor = int(parts[0]), int(parts[1].split("-")[0])
    except (IndexError, ValueError):
        return None
    return (major, minor) >= (5, 15)


def config(p: LoaderPlan) -> dict:
    """What the loader writes into the object's .rodata config for P (kb_event.h struct kb_config)."""
    spec = p.spec
    return {
        "tgid": spec.pid or 0,
        "tid": spec.tid or 0,
        "nargs": len(p.registers),
        "arg_reg": [f"{a.name}: {r}" for a, r in zip(spec.args, p.registers, strict=True)],
        "syscall": p.syscall,
        "comm": spec.comm,
        "emit_entry": "entry" in spec.handlers,
        "track_ret": "ret" in spec.handlers,
    }
