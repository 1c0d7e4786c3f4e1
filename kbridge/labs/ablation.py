"""The checker's ablation of a student's post handler: evidence from the kernel that a post count
is counted by the post handler, not copied from the pre handler.

The checker's own module (data/kbcheck_detach.c) registers a kprobe at the student's probe
address, finds the student's kprobes on the aggregate list the kernel then keeps there, and
swaps their post handlers for a no-op while it is loaded. A workload runs in between: the
student's pre handler runs at every hit, their post handler at none, and the checker's kprobe
counts the hits. The module is built by kbridge's one builder (trusted: kbridge's own code) and
loaded like the student's (owned while loaded, its unload registered in ctx.cleanups: a check
that stops early leaves nothing loaded; an oops is the guest's crash like any other).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from kbridge import kbuild
from kbridge.errors import KbridgeError
from kbridge.labs.context import LabContext
from kbridge.labs.guest import DATA, guest_run
from kbridge.labs.kmodule import LoadedModule, StudentModule
from kbridge.targets.base import GuestIOError

NAME = "kbcheck_detach"
SOURCE = DATA / f"{NAME}.c"
STATE = f"/sys/kernel/debug/{NAME}/state"
_MODULE = re.compile(r"[A-Za-z0-9_]{1,55}")  # a module name (MODULE_NAME_LEN 56 with its NUL)
_COMM = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # TASK_COMM_LEN 16


class AblationError(KbridgeError):
    """The checker could not do the step (its module did not build, load or unload): nothing proven."""


@dataclass
class Detached:
    """What the kernel showed while the student's post handlers were swapped out."""

    addr: int  # where the checker's kprobe landed
    hits: int  # its hits by the workload
    owned: int  # the student's kprobes at the address
    detached: int  # of them, those whose post handler was swapped out
    undetached: int  # those there was no room for
    others: int  # other kprobes at the address
    handlers: list[tuple[str, str]] = field(default_factory=list)  # (pre, post) names, "none" if unset
    before: dict[str, int] = field(default_factory=dict)  # the student's counters before the workload
    after: dict[str, int] = field(default_factory=dict)  # and after it

    @classmethod
    def parse(cls, text: str) -> Detached:
        """The module's state file, as kbcheck_detach.c's state_show() writes it (0 for what is missing)."""
        raw = dict(line.split(None, 1) for line in text.splitlines() if len(line.split(None, 1)) == 2)
        nums = {}
        for key in ("addr", "hits", "owned", "detached", "undetached", "others"):
            try:
                nums[key] = int(raw.get(key, "0"), 16 if key == "addr" else 10)
            except ValueError:
                nums[key] = 0
        handlers = []
        for key in sorted((k for k in raw if re.fullmatch(r"kprobe\d+", k)), key=lambda k: int(k[6:])):
            parts = dict(p.split("=", 1) for p in raw[key].split() if "=" in p)
            handlers.append((parts.get("pre", "?"), parts.get("post", "?")))
        return cls(
            nums["addr"],
            nums["hits"],
            nums["owned"],
            nums["detached"],
            nums["undetached"],
            nums["others"],
            handlers,
        )


def build(ctx: LabContext) -> StudentModule:
    """kbcheck_detach for the guest's kernel (cached by source and kernel)."""
    files = {SOURCE.name: SOURCE.read_bytes(), "Kbuild": f"obj-m := {NAME}.o\n".encode()}
    try:
        shown = f"the checker's {SOURCE.name}"
        built = kbuild.pick(kbuild.build(files, ctx.target.image, shown), shown, NAME)
    except KbridgeError as e:
        raise AblationError(f"the checker's module {NAME} did not build: {e.message}") from None
    return StudentModule(NAME, built, str(SOURCE))


def detached_run(
    ctx: LabContext, addr: int, owner: str, comm: str, argv: list[str], counters: Callable[[], dict[str, int]]
) -> Detached:
    """Run ARGV (tasks named COMM) while OWNER's kprobes at ADDR have no post handler; COUNTERS reads
    the student's counters before and after. AblationError when the step could not be done; an oops
    or a hung guest is the guest's crash (StudentCrash), as in every step of a check."""
    if not _MODULE.fullmatch(owner) or not _COMM.fullmatch(comm):
        raise AblationError(f"not a module name and comm the checker detaches: {owner!r}, {comm!r}")
    assert ctx.log is not None
    lm = LoadedModule(ctx.target, build(ctx), ctx.log)
    ctx.cleanups.append(lm.cleanup)  # after the student's: the cleanups run last first
    ok, err, said = lm.insmod(f"addr={addr:#x}", f"owner={owner}", f"comm={comm}")
    if not ok:
        why = f"-{errno.errorcode.get(err, str(err))}, {os.strerror(err)}" if err is not None else "no error number"
        raise AblationError(f"the checker's module {NAME} did not load ({why}): {' '.join(said) or 'nothing logged'}")
    before = counters()
    code, out = guest_run(ctx.target, argv, ctx.log)
    after = counters()
    try:
        state = ctx.target.read_file(STATE).decode(errors="replace")
    except GuestIOError:
        state = ""
    unloaded, said_rmmod = lm.rmmod()
    if not unloaded:
        ctx.restart = True  # the student's post handlers may still be swapped out: not a guest to reuse
        raise AblationError(f"the checker's module {NAME} did not unload: {said_rmmod}")
    if code != 0:
        raise AblationError(f"the workload {' '.join(argv)} failed ({code}) while the post handler was detached: {out}")
    if not state:
        raise AblationError(f"the checker's module {NAME} left no state in {STATE}")
    d = Detached.parse(state)
    d.before, d.after = before, after
    return d
