"""What kbridge knows of the modules it built: their copies with debug info, and what DWARF says.

kbridge.kbuild records every module it builds (the user's, a student's, kbridge's own probes)
in an index: NAME for KREL/ARCH -> the unstripped .ko and the source it came from. A crash
report maps its faulting frame to a source line through it (kbridge.crashes); an --arg on a
compiler clone of a module's function is mapped onto the clone's own arguments (clone_args).

A compiler clone is the compiler's copy of a function with another calling convention:
.constprop has the arguments every caller passes the same folded in, .isra (interprocedural
scalar replacement) drops unused ones and passes fields by value, .part is a split-off
tail. An --arg N on a clone reads the clone's Nth argument register, which need not hold
the source function's Nth parameter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.paths import cache_dir
from kbridge.spec import ArgSpec, ProbeSpec

_CLONE_SUFFIX = re.compile(r"\.(constprop|isra|part|lto_priv)\.\d+")
_CLONE_KINDS = {
    "constprop": "constants its callers always pass are folded in",
    "isra": "unused parameters dropped, others passed by value",
    "part": "a part split off the function",
    "lto_priv": "a private copy made by link-time optimisation",
}


def index_path() -> Path:
    return cache_dir() / "kbuild" / "built-modules.json"


def remember_module(name: str, krel: str, arch: str, debug_ko: Path, source: str) -> None:
    """Record that module NAME for KREL/ARCH was built by kbridge from SOURCE (shown to users)."""
    path = index_path()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[f"{arch}/{krel}/{name}"] = {"debug_ko": str(debug_ko), "source": source}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        tmp.replace(path)


def built_module(name: str, krel: str, arch: str) -> tuple[Path, str] | None:
    """The debug copy and source of module NAME as kbridge last built it for KREL/ARCH, if it did."""
    try:
        entry = json.loads(index_path().read_text())[f"{arch}/{krel}/{name}"]
        ko = Path(entry["debug_ko"])
        return (ko, entry["source"]) if ko.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def built_for(name: str, arch: str) -> bool:
    """Whether kbridge built a module NAME for ARCH (for any kernel)."""
    try:
        known = json.loads(index_path().read_text())
    except (OSError, ValueError):
        return False
    return isinstance(known, dict) and any(k.startswith(f"{arch}/") and k.endswith(f"/{name}") for k in known)


def clone_kinds(symbol: str) -> list[str]:
    """The clone suffixes of SYMBOL (MOD:SYM or SYM) in order: ['constprop', 'isra'] for f.constprop.0.isra.0."""
    return [m.group(1) for m in _CLONE_SUFFIX.finditer(symbol.rpartition(":")[2]) if m.group(1) in _CLONE_KINDS]


def clone_args(spec: ProbeSpec, arch: Arch, krel: str) -> tuple[ProbeSpec, list[str]]:
    """SPEC with its --arg positions (the source function's) mapped onto the clone it probes.

    Where kbridge built the clone's module, its DWARF says which register holds each source
    parameter at the clone's entry; a parameter folded into the clone is refused. Elsewhere
    (the kernel's own clones) the positions stay and a note says they are the clone's.
    """
    kinds = clone_kinds(spec.symbol)
    if not kinds or not spec.args:
        return spec, []
    module, _, func = spec.symbol.rpartition(":")
    base = func.split(".", 1)[0]
    what = f"{func} is a compiler clone of {base} ({'; '.join(_CLONE_KINDS[k] for k in kinds)})"
    params = None
    found = built_module(module, krel, arch.name) if module else None
    if found is not None:
        with contextlib.suppress(Exception):  # unreadable debug info: the positions stay, with the note
            from kbridge import elf  # pyelftools: only for a clone of a module kbridge built

            params = elf.clone_parameters(found[0].read_bytes(), func)
    if not params:
        return spec, [
            f"{what}: its arguments need not be {base}'s in the same positions, so --arg N reads the "
            f"clone's Nth argument register (no DWARF of {func} at hand: "
            + ("kbridge did not build its module)" if module else "a function of the kernel itself)")
        ]
    by_position = {p.position: p for p in params}
    args, notes = [], []
    for a in spec.args:
        p = by_position.get(a.index)
        if p is None:
            raise KbridgeError(f"--arg {a.name}={a.index}: {base} has {len(params)} parameters (DWARF of {module}.ko)")
        if p.const is not None:
            raise KbridgeError(
                f"--arg {a.name}={a.index}: {what}: it does not receive parameter {a.index} ({p.name}), "
                f"the compiler folded in the constant {p.const} that every caller passes (DWARF of {module}.ko)",
                f"drop --arg {a.name}={a.index}: its value is always {p.const}",
            )
        if p.register not in arch.dwarf_arg_registers:
            raise KbridgeError(
                f"--arg {a.name}={a.index}: {what}: parameter {a.index} ({p.name}) is not in an argument "
                f"register at its entry (DWARF of {module}.ko)",
                f"probe a caller of {base} to see it",
            )
        position = arch.dwarf_arg_registers.index(p.register) + 1
        args.append(ArgSpec(a.name, position))
        notes.append(
            f"--arg {a.name}={a.index}: {what}: {base}'s parameter {a.index} ({p.name}) is its argument "
            f"{position} (DWARF of {module}.ko), which kbridge reads"
        )
    return replace(spec, args=tuple(args)), notes
