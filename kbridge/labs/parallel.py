"""Grading a class: a batch split into shards for a CI system's parallel jobs, and graded on several
VMs at once on one host.

`check_parallel` runs one worker process per VM (kbridge.labs.worker). Each takes the next directory
as soon as it finished the previous one, so one slow or hanging submission holds up one VM only, and
a submission that crashes its kernel restarts that worker's VM only. Reports come back in the
batch's order, whatever the order they finish in. The first worker uses the kept VM when one runs;
the others boot VMs of their own, stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kbridge import progress
from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.labs.grading import Report
from kbridge.labs.runner import check_loaded, load_all

VM_MEMORY = int(1.5 * 2**30)  # a 1 GiB guest, QEMU's own memory and the host's share of a build
_SHARD = re.compile(r"([1-9][0-9]*)/([1-9][0-9]*)")


def default_jobs(directories: int) -> int:
    """How many VMs this host can run at once for DIRECTORIES directories: one per core, as memory allows."""
    import psutil

    cores = os.cpu_count() or 1
    memory = psutil.virtual_memory().available // VM_MEMORY
    return max(1, min(cores, int(memory), directories))


def parse_shard(text: str) -> tuple[int, int]:
    """K/N as given to --shard: (K, N) with 1 <= K <= N; a KbridgeError quoting it otherwise."""
    m = _SHARD.fullmatch(text.strip())
    if m is None or int(m[1]) > int(m[2]):
        raise KbridgeError(
            f"invalid --shard {text!r}: expected K/N with 1 <= K <= N",
            "--shard 2/4 grades the second of four shares of the directories",
        )
    return int(m[1]), int(m[2])


def shard(directories: list[Path], k: int, n: int) -> list[Path]:
    """Share K of N of DIRECTORIES: the same share whatever order they were given in (sorted by
    path, then every N-th), so N jobs of a CI matrix each grade their own and together all."""
    ordered = sorted(set(directories), key=lambda p: str(p))
    return [d for i, d in enumerate(ordered) if i % n == k - 1]


def check_parallel(directories: list[Path], arch: str | None, jobs: int, keep: bool = False) -> Iterator[Report]:
    """Grade DIRECTORIES on up to JOBS VMs at once; reports in DIRECTORIES' order."""
    loaded = load_all(directories)  # bad input is refused before any VM starts
    jobs = max(1, min(jobs, len(loaded)))
    if jobs == 1:
        yield from check_loaded(loaded, arch, keep)
        return
    a = get_arch(arch)
    pool = _Pool([d for d, _, _ in loaded], a.name, jobs, keep)
    try:
        pool.start()
        for i in range(len(loaded)):
            yield pool.result(i)
    except BaseException:  # an error, Ctrl-C, or the caller stopped reading: the workers stop now
        pool.stop(abort=True)
        raise
    pool.stop()


class _Pool:
    """JOBS worker processes fed one directory at a time; results kept by index."""

    def __init__(self, directories: list[Path], arch: str, jobs: int, keep: bool) -> None:
        self.directories = directories
        self.arch = arch
        self.jobs = jobs
        self.keep = keep
        self.next = 0
        self.results: dict[int, Report] = {}
        self.error: str | None = None
        self.lock = threading.Condition()
        self.procs: list[subprocess.Popen[str]] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.jobs):
            argv = [sys.executable, "-m", "kbridge.labs.worker", "--arch", self.arch]
            if n > 0:
                argv.append("--fresh")  # the kept VM (if any) is the first worker's
            elif self.keep:
                argv.append("--keep")
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            self.procs.append(proc)
            thread = threading.Thread(target=self._feed, args=(n, proc), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _take(self) -> int | None:
        with self.lock:
            if self.error is not None or self.next >= len(self.directories):
                return None
            self.next += 1
            return self.next - 1

    def _feed(self, n: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            while (i := self._take()) is not None:
                proc.stdin.write(json.dumps({"index": i, "directory": str(self.directories[i])}) + "\n")
                proc.stdin.flush()
                while True:
                    line = proc.stdout.readline()
                    if not line:
                        raise KbridgeError(f"grading VM {n + 1} stopped while it graded {self.directories[i]}")
                    msg = json.loads(line)
                    if "progress" in msg:
                        kind, text = msg["progress"]
                        progress.emit(kind, f"[vm {n + 1}] {text}")
                    elif "error" in msg:
                        raise KbridgeError(msg["error"], msg.get("hint"))
                    elif "report" in msg:
                        with self.lock:
                            self.results[int(msg["index"])] = Report.from_json(msg["report"])
                            self.lock.notify_all()
                        break
            proc.stdin.close()
        except (KbridgeError, OSError, ValueError, KeyError) as e:
            with self.lock:
                if self.error is None:
                    self.error = e.message if isinstance(e, KbridgeError) else f"grading VM {n + 1}: {e}"
                self.lock.notify_all()

    def result(self, i: int) -> Report:
        with self.lock:
            while i not in self.results:
                if self.error is not None:
                    raise KbridgeError(self.error)
                self.lock.wait(timeout=0.5)  # short waits: Ctrl-C is seen at once
            return self.results.pop(i)

    def stop(self, abort: bool = False) -> None:
        """End every worker: at the end of the batch they are done; on ABORT (an error, Ctrl-C) they
        are told to stop (each stops its VM), then killed if they linger."""
        with self.lock:
            self.error = self.error or ("stopped" if abort else None)
        for proc in self.procs:
            if abort and proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()
        deadline = time.monotonic() + 30
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait()
