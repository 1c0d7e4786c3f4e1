"""Render a ProbeSpec into a bcc program (BPF C) and the attach plan kbridge/guest/bpf_runner.py follows.

The same ProbeSpec as the module: kprobe (pre) and kretprobe (entry, ret),
arguments by position, pid and comm filters. Each hit that passes the filters
is counted in a BPF array map (exact, like the module's counters) and sent
through a perf buffer; the runner counts what the perf buffer lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.mechanisms import templates
from kbridge.spec import ProbeSpec

HANDLER_IDS = {"pre": 0, "post": 1, "entry": 2, "ret": 3}


@dataclass(frozen=True)
class BpfProgram:
    """The BPF C text and how to attach it."""

    text: str
    attach: list[dict]  # [{"type": "kprobe"|"kretprobe", "symbol", "offset", "fn", "maxactive"}]
    spec: ProbeSpec

    def plan(self, exclude: list[int], port: str, run_id: str) -> dict:
        """The JSON document the guest runner reads."""
        return {
            "text": self.text,
            "attach": self.attach,
            "args": [a.name for a in self.spec.args],
            "handlers": sorted(self.spec.handlers, key=HANDLER_IDS.__getitem__),
            "exclude": exclude,
            "port": port,
            "run": run_id,
        }


def render(spec: ProbeSpec, arch: Arch) -> BpfProgram:
    """The bcc program for SPEC on ARCH (SPEC's symbol already resolved), from kmod/bpf.c.j2."""
    check(spec, arch)
    syscall = arch.is_syscall_wrapper(spec.symbol)
    fields = arch.syscall_arg_fields if syscall else arch.c_arg_fields
    parts = []
    if spec.kprobe:
        parts.append(f"kprobe on {spec.symbol}+{spec.offset:#x}")
    if spec.kretprobe:
        parts.append(f"kretprobe on {spec.symbol}")
    text = templates.render(
        "bpf.c.j2",
        what=" and ".join(parts),
        kprobe=spec.kprobe,
        kretprobe=spec.kretprobe,
        handlers=sorted(spec.handlers),
        pid=int(spec.pid) if spec.pid else None,
        tid=int(spec.tid) if spec.tid else None,
        comm=spec.comm,  # make_spec allows only printable characters without quotes or backslashes
        syscall_wrapper=syscall,
        ids=SimpleNamespace(**HANDLER_IDS),
        args=[SimpleNamespace(name=a.name, field=fields[a.index - 1]) for a in spec.args],
    )
    attach: list[dict] = []
    if spec.kprobe:
        attach.append({"type": "kprobe", "symbol": spec.symbol, "offset": spec.offset, "fn": "kb_pre"})
    if spec.kretprobe:
        attach.append({"type": "kprobe", "symbol": spec.symbol, "offset": 0, "fn": "kb_entry"})
        if "ret" in spec.handlers:
            attach.append({"type": "kretprobe", "symbol": spec.symbol, "fn": "kb_ret", "maxactive": spec.maxactive})
    return BpfProgram(text, attach, spec)


def check(spec: ProbeSpec, arch: Arch) -> None:
    """What eBPF cannot do for SPEC, said before any VM boots."""
    if arch.bcc_refusal:
        raise KbridgeError(arch.bcc_refusal, f"on {arch.name} use --via kmod or --via tracefs")
    if "post" in spec.handlers:
        raise KbridgeError(
            "eBPF kprobes have no post handler (BPF programs run before the probed instruction)",
            "use --pre with --via bpf, or --via kmod for --post",
        )
    limit = len(arch.syscall_arg_fields) if arch.is_syscall_wrapper(spec.symbol) else len(arch.c_arg_fields)
    if bad := [a for a in spec.args if a.index > limit]:
        kind = "a syscall" if arch.is_syscall_wrapper(spec.symbol) else "a function (for bcc)"
        raise KbridgeError(
            f"{spec.symbol} is {kind}: it has at most {limit} register arguments, "
            f"not --arg {bad[0].name}={bad[0].index}"
        )
