"""A tracefs run in three guest commands of kbridge/guest/tracefs.sh: arm, stop, undo.

script.py passes the script its arguments and parses what it prints; Scripted is the run made of
those three commands: how a target that runs the guest script (the QEMU VM, scripted_tracefs) arms
when --steps is not asked for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from kbridge import kprobe_events, progress
from kbridge.errors import KbridgeError
from kbridge.mechanisms.tracefs import guest, script
from kbridge.mechanisms.tracefs.armed import DEFAULT_BUFFER_KB, MARKER_TIMEOUT_S, Events
from kbridge.mechanisms.tracefs.collect import CpuStats, parse_cpu_stats
from kbridge.mechanisms.tracefs.guest import TRACING, build_filter
from kbridge.spec import Hit
from kbridge.targets import ownership
from kbridge.targets.base import TRACE_PORT


class Scripted(Events):
    """The same run in three guest commands (kbridge/guest/tracefs.sh): arm, stop, undo.

    What Stepwise (stepwise.py) does file by file from the host (~40 agent round trips before the
    first event), the script does in the guest, in the same order, with the same refusals and
    explanations; `--steps` keeps Stepwise, since showing each operation and the files after it is
    its point.
    """

    def __enter__(self) -> Scripted:
        vm = self.vm
        self.dir = f"{script.RUN_DIR}/tracefs-{self.token}"
        self.port = vm.stream(TRACE_PORT)
        next(self.port)  # connect the host side before the guest writes
        threads = self._threads()
        exclude = sorted(vm.plumbing_pids())
        base = build_filter(self.user_filter, threads, self.comm, exclude)
        pairs: list[str] = []
        lines: list[str] = []
        for ev, original, line in zip(self.parsed, self.checked, self.lines, strict=True):
            rec, ledger_line = ownership.record("event", f"{ev.effective_group}/{ev.effective_event}")
            self.records.append(rec)
            lines.append(ledger_line)
            pairs += [
                line if ev == original else kprobe_events.format(ev),
                f"{ev.effective_group}/{ev.effective_event}",
            ]
        self.reader_tag = f"kb-{os.urandom(6).hex()}"
        reader, reader_line = ownership.record("process", self.reader_tag)
        self.records.append(reader)
        res = vm.run(
            script.argv(
                "arm",
                self.dir,
                ownership.LEDGER,
                "\n".join([*ownership.take_pending(vm), *lines]),
                self.reader_tag,
                reader_line,
                "" if self.buffer_kb is None else str(self.buffer_kb),
                str(DEFAULT_BUFFER_KB),
                vm.stream_path(TRACE_PORT),
                self.token,
                base,
                (self.user_filter or "").strip(),
                *pairs,
            ),
            timeout=120,
        )
        out = script.parse(res.text)
        if not res.ok or not out.verdict.startswith("ok "):
            error = self._refusal(out, res.stderr.decode(errors="replace"), pairs)
            self._teardown(completed=False)
            raise error
        self.defined = list(self.parsed)
        self.listed = out.text("L")
        self.stats_before = {cpu: parse_cpu_stats(text) for cpu, text in out.stats("S0").items()}
        return self

    def _refusal(self, out: script.Output, stderr: str, pairs: list[str]) -> KbridgeError:
        """What the arm script's refusal OUT means, as Stepwise says it."""
        kind, _, rest = out.verdict.partition(" ")
        before = kprobe_events.parse_error_log(out.text("E0"))
        after = kprobe_events.parse_error_log(out.text("E1"))
        if kind == "clash":
            how, name, *words = rest.split(" ")
            if how == "same":
                return KbridgeError(
                    f"the guest already has a kprobe event {name}: {' '.join(words).strip()!r}",
                    "name yours differently: p:GROUP/NAME ...",
                )
            other, *words = words
            return KbridgeError(
                f"the guest already has a kprobe event {other} ({' '.join(words).strip()!r}): trace_pipe "
                f"would print its hits and those of {name} alike, as {name.split('/', 1)[1]!r}",
                "give yours another event name: p:GROUP/NAME ...",
            )
        if kind == "define-failed":
            written = pairs[2 * (int(rest) - 1)]
            return guest.rejected_line(written, before, after, out.text("W").strip() or "write error")
        if kind == "filter-failed":
            ev = self.parsed[int(rest) - 1]
            return guest.rejected_filter(ev, before, after, out.text("F"))
        return KbridgeError(f"arming the tracefs events failed: {(out.verdict or stderr).strip()[-800:]}")

    def drain(self) -> Iterator[Hit]:
        """Disable, then the stop script (the end marker, the counters), then read up to its end marker."""
        # The guest agent disables: its writes are left out of the events, where the stop script's
        # shell, a new pid, would be counted for its own writes while the events are still on.
        for ev in self.defined:
            self.vm.write_file(f"{TRACING}/events/{ev.effective_group}/{ev.effective_event}/enable", b"0")
        res = self.vm.run(script.argv("stop", self.dir, self.token), timeout=60)
        self.stopped = script.parse(res.text)
        try:
            yield from self._read_until(f"kbridge-end-{self.token}")
        except TimeoutError:
            if not self.seen_start:
                raise KbridgeError(
                    f"trace_pipe did not reach the host (no start marker within {MARKER_TIMEOUT_S:.0f} s)",
                    "kbridge doctor checks the guest's stream ports",
                ) from None
            self.undrained = True
        self.drained = True

    def _stats_after(self) -> dict[str, CpuStats]:
        return {cpu: parse_cpu_stats(text) for cpu, text in self.stopped.stats("S1").items()}

    def _profile(self) -> str:
        return self.stopped.text("P")

    def _teardown(self, completed: bool) -> None:
        """The undo script: disable, stop the reader, remove the events, put the state back, release."""
        vm = self.vm
        with contextlib.suppress(Exception):
            vm.close_stream(TRACE_PORT)
        releases = [f"-{rec.key}" for rec in self.records]
        try:
            res = vm.run(
                script.argv("undo", self.dir, ownership.LEDGER, "\n".join(releases)),
                timeout=120,
            )
            out = script.parse(res.text)
            failures = [ln for ln in res.text.splitlines() if ln.startswith("failed ")]
            if out.verdict == "differs" or "differs" in res.text.splitlines():
                failures.append(f"kprobe_events differs from before the run: {out.text('K')!r}")
            if not res.ok and not failures:
                failures.append(res.stderr.decode(errors="replace").strip() or f"exit {res.exitcode}")
        except KbridgeError as e:
            failures = [e.message]
        if failures:
            msg = "tracefs cleanup failed: " + "; ".join(failures)
            if completed:
                raise KbridgeError(msg, "kbridge vm down stops the VM and with it every probe")
            progress.warn(msg)
