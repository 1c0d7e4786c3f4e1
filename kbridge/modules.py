"""A user's own out-of-tree kernel module in a guest: load it (with checked parameters), unload it.

    mod = load_module(target, Path("mydriver"), {"debug": 1})   # build (kbridge.kbuild), push, insmod
    unload_module(target, mod.name)                              # rmmod, nothing left

Parameters are checked against the module's declared `module_param`s and their
types before anything reaches the guest, and go to insmod as argv entries. The
module is loaded by kbridge's own loader (guest/insmod.c: finit_module once), a
failed init leaves nothing loaded, and the load is owned (kbridge.targets.ownership)
until it succeeded, so a kill mid-load leaves no module behind.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import json
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from kbridge import kbuild, oops, progress
from kbridge.errors import KbridgeError
from kbridge.guest import GUEST_DIR
from kbridge.kbuild import Built
from kbridge.session import Session
from kbridge.symbols import valid_module_name
from kbridge.targets import ownership
from kbridge.targets.base import GuestCrash, GuestIOError, KmsgRecord, Target

GUEST_PREFIX = "/tmp/kbridge-usermod-"  # the module and loader files while a load runs
CHARP_MAX = 1024  # kernel/params.c: param_set_charp refuses longer strings (-ENOSPC)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What a charp/string parameter may hold: the kernel splits insmod's arguments on
# spaces and honours double quotes (kernel/params.c next_arg), so a value with a space
# or a quote could smuggle in another parameter.
_STRING_VALUE = re.compile(r"[\x21-\x7e]*")
_STRING_FORBIDDEN = frozenset("\"'\\`")
# insmod errors raised by the kernel's loader before the module's init runs
# (kernel/module/main.c, 6.1); any other errno is what the init function returned.
_LOADER_ERRORS: dict[int, str] = {
    errnos.ENOEXEC: "the kernel refused the file as a module for it (vermagic, format or arch)",
    errnos.ENOENT: "the module uses a symbol this kernel does not export (the log names it)",
    errnos.EEXIST: "a module of that name is already loaded",
    errnos.EKEYREJECTED: "the module's signature was rejected",
    errnos.EPERM: "loading modules is not permitted (modules_disabled or lockdown)",
}

# (min, max) of each integer parameter type (kernel/params.c STANDARD_PARAM_DEF).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "byte": (0, 0xFF),
    "short": (-(1 << 15), (1 << 15) - 1),
    "ushort": (0, 0xFFFF),
    "int": (-(1 << 31), (1 << 31) - 1),
    "uint": (0, 0xFFFFFFFF),
    "hexint": (0, 0xFFFFFFFF),
    "long": (-(1 << 63), (1 << 63) - 1),
    "ulong": (0, (1 << 64) - 1),
    "ullong": (0, (1 << 64) - 1),
}
_BOOL_WORDS = {
    "1": "1",
    "0": "0",
    "y": "Y",
    "n": "N",
    "yes": "Y",
    "no": "N",
    "true": "Y",
    "false": "N",
    "on": "Y",
    "off": "N",
}


class LoadError(KbridgeError):
    """insmod failed; `errno` names the error (e.g. "ENODEV"), `log` holds the load's kernel log."""

    def __init__(self, message: str, hint: str | None, errno: str, log: list[str]) -> None:
        super().__init__(message, hint)
        self.errno = errno
        self.log = log


@dataclass(frozen=True)
class LoadedModule:
    """A module insmod loaded; `log` is what the kernel logged while it loaded."""

    name: str
    ko: Path
    params: dict[str, str]
    log: list[str]


# -- parameters -------------------------------------------------------------------


def parse_param(text: str) -> tuple[str, str]:
    """A --param KEY=VALUE from the command line."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise KbridgeError(f"invalid --param {text!r}: expected NAME=VALUE", "e.g. --param debug=1")
    return key, value


def validate_params(
    params: Mapping[str, str | int | bool | list | tuple] | None, declared: Mapping[str, str], module: str
) -> list[str]:
    """insmod's NAME=VALUE arguments, each checked against the module's declared parameters."""
    argv = []
    for name, value in (params or {}).items():
        if not isinstance(name, str) or not _IDENT.fullmatch(name):
            raise KbridgeError(f"invalid parameter name {name!r}: a module parameter is a C identifier")
        if name not in declared:
            known = ", ".join(f"{k} ({v})" for k, v in sorted(declared.items())) or "none"
            raise KbridgeError(f"module {module} has no parameter {name!r}", f"its parameters (module_param): {known}")
        argv.append(f"{name}={format_value(name, value, declared[name])}")
    return argv


def format_value(name: str, value: object, ptype: str) -> str:
    """VALUE as the kernel's parser for PTYPE accepts it; a KbridgeError quoting it otherwise."""
    if ptype.startswith("array of "):
        items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
        return ",".join(format_value(name, v, ptype[len("array of ") :]) for v in items)
    bad = f"invalid value {value!r} for parameter {name} ({ptype})"
    if ptype in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise KbridgeError(bad, "give an integer")
        if isinstance(value, str):
            if not re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|\d+)", value):
                raise KbridgeError(bad, "give an integer (decimal or 0x...)")
            value = int(value, 0) if not re.fullmatch(r"-?0\d+", value) else int(value, 8)
        lo, hi = _INT_RANGES[ptype]
        if not lo <= value <= hi:
            raise KbridgeError(bad, f"{ptype} holds {lo}..{hi}")
        return hex(value) if ptype == "hexint" else str(value)
    if ptype in ("bool", "invbool"):
        if isinstance(value, bool):
            return "Y" if value else "N"
        word = _BOOL_WORDS.get(str(value).lower())
        if word is None:
            raise KbridgeError(bad, "give 1/0, y/n or true/false")
        return word
    if ptype in ("charp", "string"):
        text = str(value)
        if not _STRING_VALUE.fullmatch(text) or _STRING_FORBIDDEN & set(text):
            raise KbridgeError(
                bad,
                "string parameters take printable characters without spaces, "
                "quotes or backslashes (insmod would split them)",
            )
        if len(text) > CHARP_MAX:
            raise KbridgeError(
                f"value for parameter {name} is {len(text)} characters long", f"the kernel takes at most {CHARP_MAX}"
            )
        return text
    raise KbridgeError(
        f"parameter {name} has a type kbridge cannot check ({ptype!r})",
        "use a standard module_param type (int, uint, long, bool, charp, ...)",
    )


# -- load / unload ------------------------------------------------------------------


def loaded_modules(target: Target) -> dict[str, str]:
    """Loaded module name -> its /proc/modules taint flags ("OE" for an unsigned out-of-tree one)."""
    return Session(target).modules()


def build_for(target: Target, src: Path, name: str | None = None) -> Built:
    """The module NAME of the directory SRC, built for TARGET's kernel (cached)."""
    files = kbuild.source_files(src)
    return kbuild.pick(kbuild.build(files, target.image, str(src), source=src), str(src), name)


def load_module(
    target: Target,
    src_or_built: Path | str | Built,
    params: Mapping[str, str | int | bool | list | tuple] | None = None,
    timeout: float = 60.0,
    name: str | None = None,
) -> LoadedModule:
    """Build (if given a directory), push and insmod a user's module in TARGET; its load log.

    A failed init raises LoadError (the errno and the log), an oops in init GuestCrash
    (the guest is marked for restart); either way nothing of the module stays loaded
    in a guest that is reused. An init still running after TIMEOUT s cannot be undone
    (a module whose init has not returned cannot be removed): the guest is marked for
    a restart, and the error says so.
    """
    built = src_or_built if isinstance(src_or_built, Built) else build_for(target, Path(src_or_built), name)
    if (built.krel, built.arch) != (target.krel, target.arch.name):
        raise KbridgeError(
            f"{built.ko.name} was built for {built.krel} ({built.arch}), "
            f"the guest runs {target.krel} ({target.arch.name})",
            "build it for this guest: load the source directory instead",
        )
    args = validate_params(params, built.params, built.name)  # before anything reaches the guest
    if built.name in loaded_modules(target):
        raise KbridgeError(
            f"module {built.name} is already loaded in the {target.arch.name} guest",
            f"kbridge module unload {built.name}",
        )
    loader = kbuild.build_guest_program(GUEST_DIR / "insmod.c", target.image)
    # Both are removed once loaded: the kernel keeps its own copy of the module.
    guest_ko = f"{GUEST_PREFIX}{built.name}.ko"
    guest_loader = f"{GUEST_PREFIX}insmod-{secrets.token_hex(4)}"
    res = None
    # Owned while it loads: a kbridge killed mid-load leaves no module behind (the next command
    # unloads it). Once loaded it is the user's, and stays.
    record = ownership.claim(target, "module", built.name)
    try:
        target.write_file(guest_ko, built.ko.read_bytes())
        target.write_file(guest_loader, loader.read_bytes())
        target.run(["/bin/busybox", "chmod", "0700", guest_loader], timeout=30)
        with _logged(target, f"insmod {built.name}") as log:
            # Values were validated: no spaces or quotes, so the kernel splits these exactly.
            proc = target.spawn([guest_loader, guest_ko, " ".join(args)])
            try:
                res = target.wait(proc, timeout=timeout)
            except GuestIOError:
                target.mark_crashed()
                raise KbridgeError(
                    f"{built.name}'s init was still running after {timeout:.0f} s: a module whose init has "
                    "not returned cannot be removed, so this VM is marked for a restart (the next command "
                    "boots a fresh one)",
                    "an init must return: do long work in a workqueue or a kthread, not in init",
                ) from None
    finally:
        with contextlib.suppress(KbridgeError):
            target.run(["/bin/busybox", "rm", "-f", guest_ko, guest_loader], timeout=10)
        if res is not None and (res.ok or built.name not in loaded_modules(target)):
            ownership.release(target, record)
    lines = [r.text for r in log]
    if res.ok:
        _note_loaded(target, built.name, True)
    if any(oops.is_crash(line) for line in lines) or res.signal is not None:
        target.mark_crashed()
        text = "\n".join(lines) or target.console_tail()
        how = f"the loader was killed by signal {res.signal}" if res.signal else "the kernel log shows an oops"
        raise GuestCrash(
            f"loading {built.name} crashed the guest kernel in its init ({how}); "
            "the module cannot be removed from this guest",
            text,
        )
    if any(oops.is_oops(line) for line in lines):
        # A WARN or a bug checker's report (KASAN, lockdep...) in init: the module loaded and the kernel
        # went on; the command fails with the report once it ends (kbridge.targets.watch).
        progress.warn(f"{built.name}'s init made the kernel report a bug or a warning; {built.name} is loaded")
    if not res.ok:
        err = res.exitcode if 0 < res.exitcode < 250 else None
        why = "the loader could not open the module file" if res.exitcode == 250 else res.text
        left = built.name in loaded_modules(target)
        raise _load_error(built.name, err, why, lines, left)
    return LoadedModule(built.name, built.ko, dict(a.split("=", 1) for a in args), lines)


def unload_module(target: Target, name: str, missing_ok: bool = False, timeout: float = 60.0) -> list[str]:
    """rmmod NAME (a module loaded by load_module); the kernel log of its exit."""
    name = valid_module_name(name)
    mods = loaded_modules(target)
    if name not in mods:
        if missing_ok:
            return []
        ours = sorted(n for n, f in mods.items() if "O" in f)
        raise KbridgeError(
            f"module {name!r} is not loaded in the {target.arch.name} guest",
            f"loaded out-of-tree modules: {', '.join(ours)}" if ours else "no out-of-tree module is loaded",
        )
    if "O" not in mods[name]:
        # The guest's own drivers (virtio_console carries the agent kbridge talks through).
        raise KbridgeError(
            f"module {name!r} is part of the guest kernel, not one you loaded",
            "kbridge module unload removes out-of-tree modules only",
        )
    with _logged(target, f"rmmod {name}") as log:
        res = target.run(["/sbin/rmmod", name], timeout=timeout)
    lines = [r.text for r in log]
    if any(oops.is_crash(line) for line in lines):
        target.mark_crashed()
        raise GuestCrash(f"unloading {name} crashed the guest kernel: its exit function oopsed", "\n".join(lines))
    if not res.ok:
        why = res.stderr.decode(errors="replace").strip()
        holders = _holders(target, name)
        hint = (
            f"it is in use by {', '.join(holders)}: unload those first"
            if holders
            else "close what holds it open (a process with its device open), then unload it"
        )
        raise KbridgeError(f"rmmod {name} failed: {why}", hint)
    if name in loaded_modules(target):
        raise KbridgeError(f"module {name} is still loaded after rmmod")
    _note_loaded(target, name, False)
    return lines


def _note_loaded(target: Target, name: str, loaded: bool) -> None:
    """The user's modules loaded in TARGET, kept on the host: a crashed guest's are named when it restarts."""
    path = target.host_state() / "modules.json"
    try:
        names = set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        names = set()
    names = names | {name} if loaded else names - {name}
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(sorted(names)))


def unload_since(target: Target, before: set[str]) -> list[str]:
    """Unload the out-of-tree modules loaded since BEFORE was taken (test cleanup); their names.

    Dependants go first: a module another one uses cannot be removed before it.
    """
    left = {n for n, flags in loaded_modules(target).items() if n not in before and "O" in flags}
    done: list[str] = []
    while left:
        progress_made = False
        for name in sorted(left):
            with contextlib.suppress(KbridgeError):
                unload_module(target, name)
                done.append(name)
                progress_made = True
        left -= set(done)
        if not progress_made:
            raise KbridgeError(
                f"could not unload {', '.join(sorted(left))} after the test",
                "something holds them (an open device, another module)",
            )
    return done


def _holders(target: Target, name: str) -> list[str]:
    with contextlib.suppress(KbridgeError):
        out = target.run(["/bin/busybox", "ls", f"/sys/module/{name}/holders"], timeout=10)
        return out.text.split()
    return []


@contextlib.contextmanager
def _logged(target: Target, what: str) -> Iterator[list[KmsgRecord]]:
    """The kernel log records written while the body runs, between two markers kbridge writes.

    The log stream replays the backlog when it is opened, so the records of this
    step are those after our own start marker and before our end marker.
    """
    token = secrets.token_hex(4)
    start, end = f"kbridge: {what} {token} start", f"kbridge: {what} {token} end"
    stream = target.kmsg()
    records: list[KmsgRecord] = []
    target.write_file("/dev/kmsg", (start + "\n").encode())
    try:
        yield records
    finally:
        with contextlib.suppress(KbridgeError):
            target.write_file("/dev/kmsg", (end + "\n").encode())
            _collect(stream, start, end, records)


def _collect(
    stream: Iterator[KmsgRecord | None], start: str, end: str, records: list[KmsgRecord], timeout: float = 15.0
) -> None:
    seen = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = next(stream)
        if rec is None:
            continue
        if rec.text == start:
            seen = True
        elif rec.text == end:
            return
        elif seen and rec.from_kernel:  # user space's own /dev/kmsg lines are not the kernel's log
            records.append(rec)
    progress.warn("the kernel log of this step did not arrive completely")


def _load_error(name: str, err: int | None, other: str, log: list[str], left: bool) -> LoadError:
    ename = errnos.errorcode.get(err, "unknown") if err is not None else "unknown"
    if err in _LOADER_ERRORS:
        why = f"-{ename}: {_LOADER_ERRORS[err]}"
    elif err is not None:
        why = f"its init function returned -{ename} ({os.strerror(err)})"
    else:
        why = other
    body = "\n".join(f"  {line}" for line in log) or "  (the kernel logged nothing)"
    msg = f"loading module {name} failed: {why}\nkernel log of the load:\n{body}"
    if left:
        msg += f"\n{name} is still listed in /proc/modules: the guest needs a restart (kbridge vm down)"
    hint = "kbridge vm down, then up again" if left else "nothing of it stayed loaded; fix it and load again"
    return LoadError(msg, hint, ename, log)
