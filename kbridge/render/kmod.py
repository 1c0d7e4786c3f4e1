"""Render a ProbeSpec into a kernel module: C source and Kbuild from the templates in kmod/."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.spec import ProbeSpec


def template_dir() -> Path:
    """kmod/ from the installed package, else from the source tree."""
    installed = Path(__file__).resolve().parent.parent / "kmod"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "kmod"


@dataclass(frozen=True)
class ModuleSource:
    """A rendered module: its name and the files kbuild needs."""

    name: str
    files: dict[str, str]  # file name -> text

    @property
    def source(self) -> str:
        return self.files[f"{self.name}.c"]

    def digest(self) -> str:
        h = hashlib.sha256()
        for fname in sorted(self.files):
            h.update(fname.encode() + b"\0" + self.files[fname].encode() + b"\0")
        return h.hexdigest()


def module_name(spec: ProbeSpec) -> str:
    """kb_<symbol>_<hash>: readable in lsmod, unique per spec, within MODULE_NAME_LEN (56)."""
    key = repr((spec.symbol, sorted(spec.handlers), spec.offset, spec.args, spec.maxactive, spec.comm))
    stem = re.sub(r"[^A-Za-z0-9_]", "_", spec.symbol)[:36]
    return f"kb_{stem}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def is_syscall_wrapper(symbol: str, arch: Arch) -> bool:
    return symbol.startswith(arch.syscall_prefix)


def render(spec: ProbeSpec, arch: Arch) -> ModuleSource:
    """The C source and Kbuild for SPEC on ARCH (SPEC's symbol must already be resolved)."""
    if is_syscall_wrapper(spec.symbol, arch) and any(a.index > 6 for a in spec.args):
        raise KbridgeError(f"{spec.symbol} is a syscall: it has at most 6 arguments")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    name = module_name(spec)
    ctx = {
        "module": name,
        "symbol": spec.symbol,
        "offset": spec.offset,
        "handlers": [h for h in ("pre", "post", "entry", "ret") if h in spec.handlers],
        "kprobe": spec.kprobe,
        "kretprobe": spec.kretprobe,
        "args": spec.args,
        "maxactive": spec.maxactive,
        "comm": spec.comm,
        "syscall_wrapper": is_syscall_wrapper(spec.symbol, arch),
        "arch": arch.name,
    }
    return ModuleSource(name, {
        f"{name}.c": env.get_template("probe.c.j2").render(ctx),
        "Kbuild": env.get_template("Kbuild.j2").render(ctx),
    })
