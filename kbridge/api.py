"""The Python API: a guest kernel to probe from tests and notebooks.

    import kbridge

    with kbridge.vm(arch="arm64") as vm:
        run = vm.probe("ksys_write", pre=True, args={"count": 3}, run="echo hi > /tmp/x")
        print(run.counts, [h.args for h in run.hits])

The pytest plugin's `kbridge_vm` fixture is the same object. A Guest on a kept
VM (`kbridge vm up`, or the fixture's) attaches to it for each call only, so
kbridge commands in other processes can use the VM between calls. A Guest on a
Vagrant machine keeps one SSH connection (and the machine's lock) for its life.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from typing_extensions import Unpack

from kbridge import kernels
from kbridge.arch import Arch, get_arch
from kbridge.mechanisms.engine import HitSink, MechanismResult, StopRule
from kbridge.probe import ProbeRun, probe_on
from kbridge.session import Session
from kbridge.spec import ProbeSpec, make_spec
from kbridge.targets import TargetSpec, acquire, kept_as_is, parse_target, watch
from kbridge.targets.base import Target
from kbridge.workload import Workload

if TYPE_CHECKING:
    from kbridge.compare import Comparison
    from kbridge.inspect import Inspection
    from kbridge.modules import LoadedModule


class ProbeOptions(TypedDict, total=False):
    """What a probe is, for Guest.spec() and Guest.probe(); no handler given means pre."""

    pre: bool
    post: bool
    entry: bool
    ret: bool
    args: dict[str, int] | list[str] | None
    offset: int
    maxactive: int
    pid: int | None
    comm: str | None
    tid: int | None


@dataclass(frozen=True)
class RunResult:
    """A finished guest command: its exit status and what it printed, as text."""

    exitcode: int
    stdout: str
    stderr: str
    signal: int | None = None  # the signal that killed it, if one did

    @property
    def ok(self) -> bool:
        """Exit status 0 and not killed."""
        return self.exitcode == 0 and self.signal is None

    @property
    def text(self) -> str:
        """stdout (the name ExecResult gives it)."""
        return self.stdout


class Guest:
    """A guest kernel: probe, trace, compare, inspect, run commands, move files, load modules.

    Attributes: ``arch`` (the arch's name: "x86_64", "arm64", "arm"), ``arch_info`` (its kbridge.arch.Arch:
    registers, syscall prefix, breakpoint...), ``suite`` (the kernel: a Debian suite, "debug" or
    "tree:PATH", as kbridge.kernels.resolve gives it),
    ``krel`` (`uname -r` in the guest), ``name`` ("qemu:x86_64", "vagrant:MACHINE"), ``accel``
    ("tcg", "kvm", or the provider's), ``flavour`` ("default", "bcc", "debug", "tree"), ``where`` (the parsed
    target). Every call attaches to the guest for its duration; a crash report the kernel prints
    during a call (an oops, a WARN, a sanitizer's report) makes it raise GuestCrash.
    """

    def __init__(self, arch: Arch, suite: str, where: TargetSpec, held: Target | None = None) -> None:
        self.arch_info = arch
        self.arch = arch.name
        self.suite = suite
        self.where = where
        self._held = held  # an ephemeral VM, or a Vagrant machine's connection: held for the Guest's life
        with self._target() as t:
            self.krel = t.krel
            self.name = t.name
            self.accel = t.accel
            self.flavour = t.flavour

    @contextlib.contextmanager
    def _target(self, as_is: bool = False) -> Iterator[Target]:
        """The guest for one call. AS_IS: a kept VM that crashed is used as it is (its kernel can
        still be read), not restarted; nothing is watched."""
        if self._held is not None:
            with contextlib.ExitStack() as stack:
                if not as_is:
                    stack.enter_context(watch(self._held))
                yield self._held
            return
        if as_is and self.where.kind == "qemu" and (vm := kept_as_is(self.arch_info, self.suite)) is not None:
            try:
                yield vm
            finally:
                vm.release()
            return
        with acquire(self.arch_info, kernel=self.suite, target=self.where) as t:
            yield t

    def crashed(self) -> bool:
        """Whether the guest's kernel crashed (an oops, a panic): the next call restarts it."""
        with self._target(as_is=True) as t:
            return t.crashed()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A Session on the guest, holding it (the kept VM's lock) for the block."""
        with self._target() as t:
            yield Session(t)

    # -- probes ------------------------------------------------------------------

    def spec(self, symbol: str, **opts: Unpack[ProbeOptions]) -> ProbeSpec:
        """A validated ProbeSpec; args as {"count": 3} or ["count=3"]. No handler given means pre."""
        unknown = sorted(opts.keys() - ProbeOptions.__annotations__.keys())
        if unknown:
            raise TypeError(f"spec() got an unexpected keyword argument {unknown[0]!r}")
        on = {h for h in ("pre", "post", "entry", "ret") if opts.get(h)}
        args = opts.get("args")
        arg_list = [f"{k}={v}" for k, v in args.items()] if isinstance(args, dict) else list(args or [])
        return make_spec(
            symbol,
            on or {"pre"},
            arg_list,
            self.arch_info,
            opts.get("offset", 0),
            opts.get("maxactive", 0),
            opts.get("pid"),
            opts.get("comm"),
            tid=opts.get("tid"),
        )

    def probe(
        self,
        symbol: str,
        *,
        run: str | list[str] | None = None,
        count: int | None = None,
        duration: float | None = None,
        via: str = "kmod",
        on_hit: HitSink | None = None,
        **opts: Unpack[ProbeOptions],
    ) -> ProbeRun:
        """Probe SYMBOL through VIA while RUN runs in the guest; `.hits`, `.counts` on the result.

        OPTS are spec()'s: pre, post, entry, ret, args, offset, maxactive, pid, comm, tid.
        """
        spec = self.spec(symbol, **opts)
        with self.session() as s:
            return probe_on(s, spec, None, _workload(run), StopRule(count=count, duration=duration), on_hit, via)

    def trace(
        self,
        *lines: str,
        run: str | list[str] | None = None,
        filter: str | None = None,  # noqa: A002 - the name of the CLI's --filter
        pid: int | None = None,
        comm: str | None = None,
        tid: int | None = None,
        count: int | None = None,
        duration: float | None = None,
        buffer_kb: int | None = None,
        on_hit: HitSink | None = None,
    ) -> MechanismResult:
        """kprobe_events LINES, as written, while RUN runs; counters are keyed GROUP/EVENT."""
        from kbridge.mechanisms import tracefs
        from kbridge.workload import default_for

        with self.session() as s:
            work = _workload(run) or default_for("")
            return tracefs.run_lines(
                s,
                list(lines),
                work,
                StopRule(count=count, duration=duration),
                on_hit,
                filter=filter,
                buffer_kb=buffer_kb,
                pid=pid,
                comm=comm,
                tid=tid,
            )

    def compare(
        self,
        symbol: str,
        run: str,
        *,
        pre: bool = False,
        entry: bool = False,
        ret: bool = False,
        args: dict[str, int] | list[str] | None = None,
        pid: int | None = None,
        comm: str | None = None,
        repeats: int = 5,
        only: tuple[str, ...] | None = None,
    ) -> Comparison:
        """SYMBOL through kmod, tracefs and bpf (bpf needs the bcc flavour) with RUN repeated REPEATS times."""
        from kbridge.compare import compare
        from kbridge.mechanisms import NAMES

        spec = self.spec(symbol, pre=pre, entry=entry, ret=ret, args=args, pid=pid, comm=comm)
        with self.session() as s:
            return compare(s, spec, run, repeats, only or NAMES)

    def inspect(self, symbol: str, offset: int = 0) -> Inspection:
        """How the kernel plants a kprobe on SYMBOL+OFFSET: bytes before, armed, after; the mode."""
        from kbridge.inspect import inspect

        with self.session() as s:
            return inspect(s, symbol, offset)

    # -- the guest itself ------------------------------------------------------------

    def run(self, command: str | list[str], timeout: float | None = 120) -> RunResult:
        """Run COMMAND as root in the guest (a string goes to /bin/sh -c) and wait for it; its output as text."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        with self._target() as t:
            res = t.run(argv, timeout=timeout)
        return RunResult(
            res.exitcode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace"), res.signal
        )

    def kernel_log(self, since: float | None = None) -> str:
        """The guest kernel's log (dmesg); with SINCE (a time.monotonic() of this host), only what it
        logged since then (guest and host clocks advance together: the offset is read now). A guest
        whose kernel crashed is read as it is, before any restart."""
        with self._target(as_is=True) as t:
            text = t.run(["/bin/busybox", "dmesg"], timeout=60).text
            if since is None:
                return text
            uptime = float(t.read_file("/proc/uptime").split()[0])
        start = uptime - (time.monotonic() - since) - 0.5
        kept = []
        for line in text.splitlines():
            m = re.match(r"\[\s*(\d+\.\d+)\]", line)
            if m is None or float(m[1]) >= start:
                kept.append(line)
        return "\n".join(kept)

    def read_file(self, path: str) -> bytes:
        with self._target() as t:
            return t.read_file(path)

    def write_file(self, path: str, data: bytes) -> None:
        with self._target() as t:
            t.write_file(path, data)

    def push(self, local: str | Path, guest: str) -> str:
        """Copy a local file into the guest (mode kept); the guest path it landed at."""
        from kbridge.targets import files

        with self._target() as t:
            return files.push(t, Path(local), guest)

    def pull(self, guest: str, local: str | Path) -> Path:
        """Copy a guest file to LOCAL (a file or directory); the local path written."""
        from kbridge.targets import files

        with self._target() as t:
            return files.pull(t, guest, Path(local))

    def load_module(
        self, path: str | Path, params: dict[str, str | int] | None = None, reload: bool = False
    ) -> LoadedModule:
        """Build (if needed) and insmod the out-of-tree module in directory PATH.

        RELOAD: if a module of that name is loaded already (a previous run left it), unload it first.
        """
        from kbridge import modules

        with self._target() as t:
            if reload:
                built = modules.build_for(t, Path(path))
                modules.unload_module(t, built.name, missing_ok=True)
                return modules.load_module(t, built, params)
            return modules.load_module(t, Path(path), params)

    def unload_module(self, name: str) -> list[str]:
        """rmmod NAME (a module loaded with load_module); the kernel log lines of the unload."""
        from kbridge import modules

        with self._target() as t:
            return modules.unload_module(t, name)

    def loaded_modules(self) -> set[str]:
        with self.session() as s:
            return s.loaded_modules()

    def kprobes_list(self) -> str:
        with self.session() as s:
            return s.kprobes_list()


def _workload(run: str | list[str] | None) -> Workload | None:
    if run is None:
        return None
    if isinstance(run, str):
        return Workload.shell(run)
    return Workload(tuple(run), " ".join(run))


@contextlib.contextmanager
def vm(
    arch: str | None = None,
    kernel: str | None = None,
    target: str | None = None,
    keep: bool = False,
    bcc: bool = False,
    vagrantfile: str | Path | None = None,
    kernel_tree: str | Path | None = None,
) -> Iterator[Guest]:
    """A guest for the block: the kept VM of ARCH and KERNEL if one runs, else a fresh one.

    KERNEL is a Debian suite or its version ("6.1"), or "debug" (kbridge's KASAN/lockdep kernel);
    KERNEL_TREE a kernel tree you built, instead. A fresh VM is stopped when the block ends, unless
    KEEP. BCC boots the image with bcc. TARGET "vagrant:NAME" uses a Vagrant machine instead (of the
    Vagrantfile in VAGRANTFILE, else VAGRANT_CWD, else the current directory): its own arch, one SSH
    connection for the whole block.
    """
    suite, where = kernels.resolve(kernel, kernel_tree), parse_target(target)
    a = get_arch(arch) if arch is not None or where.kind == "qemu" else None
    vf = Path(vagrantfile) if vagrantfile is not None else None
    # Each call of the Guest watches the guest for crash reports itself.
    with acquire(
        a, "bcc" if bcc else "default", keep=keep, kernel=suite, target=where, vagrantfile=vf, watched=False
    ) as t:
        if t.kept and where.kind == "qemu":
            t.release()  # re-attached per call, so other kbridge processes can use it in between
            yield Guest(t.arch, suite, where)
        else:
            # An ephemeral VM, or a Vagrant machine: held (one connection) for the Guest's life.
            yield Guest(t.arch, suite, where, held=t)
