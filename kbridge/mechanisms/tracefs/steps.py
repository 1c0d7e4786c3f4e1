"""`kbridge trace --steps`: each tracefs operation as it is done, with the files read back after it.

The kprobe walk-through is a sequence of file operations under
/sys/kernel/tracing (also mounted at /sys/kernel/debug/tracing): append a line
to kprobe_events, find the new events/kprobes/NAME/ directory with its enable
and filter files, enable, read trace, disable, read kprobe_profile, remove the
event with a `-:` line. The tracefs mechanism calls a StepReporter after each
of those operations; the reporter reads back what the kernel now shows there
and hands one Step to the sink (the CLI prints it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from kbridge.arch import Arch
from kbridge.targets.base import Target

TRACING = "/sys/kernel/tracing"
DEBUG_TRACING = "/sys/kernel/debug/tracing"  # the walk-through's path: tracefs, auto-mounted inside debugfs
READBACK_LIMIT = 4000  # characters of one file shown per step (kprobe_events may hold other users' lines)


@dataclass(frozen=True)
class Step:
    """One tracefs operation: the shell equivalent, and files read back after it (path -> text)."""

    command: str
    readback: dict[str, str] = field(default_factory=dict)
    ok: bool = True
    note: str = ""  # why kbridge does this step, when the walk-through does not


StepSink = Callable[[Step], None]


def shell_quote(text: str) -> str:
    """TEXT in single quotes for display (the operations themselves never go through a shell)."""
    return "'" + text.replace("'", "'\\''") + "'"


def relative(path: str) -> str:
    return path[len(TRACING) + 1 :] if path.startswith(TRACING + "/") else path


class StepReporter:
    """Reads back tracefs files after each operation and reports Steps to SINK."""

    def __init__(self, target: Target, sink: StepSink) -> None:
        self.target = target
        self.sink = sink

    def _read(self, path: str) -> str:
        try:
            text = self.target.read_file(path).decode(errors="replace")
        except Exception as e:  # noqa: BLE001 - a read-back that fails is shown, never fatal
            return f"(unreadable: {e})"
        return text if len(text) <= READBACK_LIMIT else text[:READBACK_LIMIT] + "\n…"

    def _ls(self, path: str) -> str:
        res = self.target.run(["/bin/busybox", "ls", path], timeout=30)
        return " ".join(res.stdout.decode(errors="replace").split()) if res.ok else "(no such directory)"

    def wrote(self, path: str, data: str, append: bool = False, readback: tuple[str, ...] = (), note: str = "") -> None:
        """DATA was written to PATH; READBACK (default: PATH itself) is shown as the kernel has it now."""
        op = ">>" if append else ">"
        paths = readback or (path,)
        command = f"echo {shell_quote(data)} {op} {relative(path)}"
        self.sink(Step(command, {relative(p): self._read(p) for p in paths}, note=note))

    def mounts(self) -> None:
        """Where tracefs is mounted (the walk-through's `mount -t debugfs` and `cd .../tracing`)."""
        mounts = [
            line
            for line in self._read("/proc/mounts").splitlines()
            if len(line.split()) > 2 and line.split()[2] in ("tracefs", "debugfs")
        ]
        self.sink(Step("grep -E 'tracefs|debugfs' /proc/mounts", {"/proc/mounts": "\n".join(mounts) or "(neither)"}))
        dirs = {d: self._stat(d) for d in (TRACING, DEBUG_TRACING)}
        same = dirs[TRACING] is not None and dirs[TRACING] == dirs[DEBUG_TRACING]
        self.sink(
            Step(
                f"cd {TRACING}",
                {d: f"exists (device:inode {dev})" if dev else "(no such directory)" for d, dev in dirs.items()},
                note=(
                    f"{DEBUG_TRACING} is the same tracefs: mounting debugfs mounts tracefs at its tracing/ "
                    f"(Linux 4.1+); {TRACING} is where tracefs lives on its own"
                    if same
                    else f"only {TRACING} is there: {DEBUG_TRACING} appears once debugfs is mounted "
                    "(mount -t debugfs none /sys/kernel/debug)"
                    if dirs[TRACING]
                    else "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
                ),
            )
        )

    def _stat(self, path: str) -> str | None:
        """PATH's device:inode, or None when it is not there."""
        res = self.target.run(["/bin/busybox", "stat", "-c", "%d:%i", f"{path}/."], timeout=30)
        return res.stdout.decode().strip() if res.ok else None

    def defined(self, line: str, group: str, event: str) -> None:
        """LINE was appended to kprobe_events: the file, and the event's new directory."""
        self.wrote(f"{TRACING}/kprobe_events", line, append=True)
        d = f"{TRACING}/events/{group}/{event}"
        self.sink(
            Step(
                f"ls {relative(d)}/",
                {
                    f"{relative(d)}/": self._ls(d),
                    f"{relative(d)}/enable": self._read(f"{d}/enable"),
                    f"{relative(d)}/filter": self._read(f"{d}/filter"),
                },
            )
        )

    def reading(self, path: str, what: str) -> None:
        """PATH is being read (streamed) from now on: no read-back, it is the hits that follow."""
        self.sink(Step(f"cat {relative(path)}   # {what}"))

    def show(self, path: str, note: str = "") -> None:
        """cat PATH, as the kernel has it now (NOTE: what its columns mean)."""
        self.sink(Step(f"cat {relative(path)}" + (f"   # {note}" if note else ""), {relative(path): self._read(path)}))

    def removed(self, line: str, group: str, event: str) -> None:
        """LINE (-:GROUP/EVENT) was appended: kprobe_events without it, and the directory gone."""
        self.wrote(f"{TRACING}/kprobe_events", line, append=True)
        self.sink(Step(f"ls events/{group}/", {f"events/{group}/": self._ls(f"{TRACING}/events/{group}")}))

    def failed(self, command: str) -> None:
        """COMMAND was refused: the kernel's error_log says why."""
        with contextlib.suppress(Exception):
            self.sink(Step(command, {"error_log": self._read(f"{TRACING}/error_log")}, ok=False))


def syscall_rewrite_note(requested: str, resolved: str, arch: Arch) -> str | None:
    """One line when a syscall name the kernel no longer has was rewritten to its entry wrapper."""
    if requested == resolved or not arch.is_syscall_wrapper(resolved):
        return None
    since = arch.syscall_wrapper_since
    return (
        f"the kernel would refuse {requested!r} as written: since Linux {since} {arch.name} enters "
        f"syscalls through pt_regs wrappers (CONFIG_ARCH_HAS_SYSCALL_WRAPPER) and has no {requested} "
        f"symbol: the write fails with ENOENT and error_log says 'Invalid probed address or symbol' "
        f"(measured on 6.1); kbridge writes {resolved} instead"
    )
