"""A CI workflow a teacher drops into the class's repository: `kbridge lab ci --github`.

The GitHub Actions workflow grades every submission of one lab on both arches, each arch split into
shards (`kbridge lab check --shard K/N`, a job each in a matrix), keeps kbridge's image cache
between runs (actions/cache), and merges the shards into a gradebook (`kbridge lab report`) kept as
an artifact. A student's failed check does not fail the job (exit 1 is a grade); anything else
(bad input, a missing tool) does. Every value put into the workflow is checked first: it ends up
in YAML and in shell lines.
"""

from __future__ import annotations

import re

from kbridge.arch import ARCHES, get_arch
from kbridge.errors import KbridgeError
from kbridge.labs import get

# GitHub's ubuntu runners are x86_64: every other arch's modules are cross-built there.
RUNNER_ARCH = "x86_64"
_APT = "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y"
_TOOLS = "debian-archive-keyring e2fsprogs zstd bubblewrap python3-venv"
_GLOB = re.compile(r"[A-Za-z0-9_.*?/\[\]-]+")
_PIP = re.compile(r"[A-Za-z0-9_.:/@+=~-]+")
_RUNNER = re.compile(r"[a-z0-9.-]+")


def github_workflow(
    lab: str,
    submissions: str | None = None,
    shards: int = 4,
    arches: tuple[str, ...] = (),
    install: str = "./kbridge",
    runs_on: str = "ubuntu-24.04",
) -> str:
    """The workflow's YAML for LAB: SUBMISSIONS is the glob of the students' lab directories
    (default submissions/*/LAB), INSTALL what pip installs kbridge from (default: a checkout at ./kbridge,
    e.g. a git submodule)."""
    the_lab = get(lab)
    glob = submissions or f"submissions/*/{the_lab.name}"
    if not _GLOB.fullmatch(glob) or glob.startswith("-"):
        raise KbridgeError(
            f"invalid --submissions {glob!r}: a path glob of letters, digits, / . _ - * ? [ ]",
            "e.g. --submissions 'submissions/*/kprobe-module'",
        )
    if not 1 <= shards <= 64:
        raise KbridgeError(f"invalid --shards {shards}: from 1 to 64 jobs per arch")
    arches = arches or the_lab.arches
    for a in arches:
        if a not in ARCHES:
            raise KbridgeError(f"unknown arch {a!r}", f"use one of: {', '.join(ARCHES)}")
        if a not in the_lab.arches:
            raise KbridgeError(
                f"lab {the_lab.name!r} does not run on {a!r}: its material is written for {', '.join(the_lab.arches)}",
                f"use --arch {' --arch '.join(the_lab.arches)}",
            )
    if not _PIP.fullmatch(install) or install.startswith("-"):
        raise KbridgeError(
            f"invalid --install {install!r}: a pip requirement or path without spaces or quotes",
            "e.g. --install ./kbridge, or --install git+https://example.org/kbridge.git@v1",
        )
    if not _RUNNER.fullmatch(runs_on):
        raise KbridgeError(f"invalid --runs-on {runs_on!r}", "e.g. --runs-on ubuntu-24.04")
    local = install.startswith(("./", "../", "/"))
    cache_key = (
        f"kbridge-${{{{ matrix.arch }}}}-${{{{ hashFiles('{install.removeprefix('./')}/pyproject.toml') }}}}"
        if local and not install.startswith("/")
        else f"kbridge-${{{{ matrix.arch }}}}-{re.sub(r'[^A-Za-z0-9._-]', '-', install)}"
    )
    out = "grades-${{ matrix.arch }}-${{ matrix.shard }}.jsonl"
    shard_list = ", ".join(str(i) for i in range(1, shards + 1))
    checkout = "      - uses: actions/checkout@v4\n" + ("        with:\n          submodules: true\n" if local else "")
    return f"""# Grades {the_lab.name} ({the_lab.title}) for every directory matching {glob},
# on {" and ".join(arches)}, {shards} shard(s) per arch; the gradebook (CSV and HTML) is the
# "gradebook" artifact. Written by `kbridge lab ci --github`.
name: grade {the_lab.name}

on:
  push:
  workflow_dispatch:

permissions:
  contents: read

jobs:
  grade:
    runs-on: {runs_on}
    timeout-minutes: 120
    strategy:
      fail-fast: false
      matrix:
        arch: [{", ".join(arches)}]
        shard: [{shard_list}]
    steps:
{checkout}      - name: Install QEMU, the compilers and bubblewrap
        run: |
          sudo apt-get update
          {install_line(arches)}
      - name: Let bubblewrap sandbox the builds (unprivileged user namespaces, Ubuntu 23.10+)
        run: sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0
      - name: Install kbridge
        run: python3 -m venv .venv && .venv/bin/pip install {install}
      - name: Keep kbridge's guest images between runs
        uses: actions/cache@v4
        with:
          path: ~/.cache/kbridge
          key: {cache_key}
      - name: Grade shard ${{{{ matrix.shard }}}} of {shards} on ${{{{ matrix.arch }}}}
        # Exit status 1 means a student's check failed: a grade, not a broken job.
        run: |
          status=0
          .venv/bin/kbridge lab check --arch "${{{{ matrix.arch }}}}" --shard "${{{{ matrix.shard }}}}/{shards}" \\
            --json {glob} > "{out}" || status=$?
          test "$status" -le 1
      - uses: actions/upload-artifact@v4
        with:
          name: grades-${{{{ matrix.arch }}}}-${{{{ matrix.shard }}}}
          path: {out}

  gradebook:
    needs: grade
    runs-on: {runs_on}
    steps:
{checkout}      - name: Install kbridge
        run: python3 -m venv .venv && .venv/bin/pip install {install}
      - uses: actions/download-artifact@v4
        with:
          pattern: grades-*
          merge-multiple: true
      - name: Merge the shards into a gradebook
        run: .venv/bin/kbridge lab report grades-*.jsonl --csv gradebook.csv --html gradebook.html
      - uses: actions/upload-artifact@v4
        with:
          name: gradebook
          path: |
            gradebook.csv
            gradebook.html
"""


def install_line(arches: tuple[str, ...]) -> str:
    """The runner's apt-get install: QEMU for both ARM arches (one package), gcc, and each other arch's
    cross compiler and binutils (from the arch table's triplet: gcc-12-arm-linux-gnueabihf...)."""
    cross = [get_arch(a).gnu_triplet.replace("_", "-") for a in arches if get_arch(a).name != RUNNER_ARCH]
    packages = ["qemu-system-x86 qemu-system-arm make gcc-12"]
    packages += [f"gcc-12-{t} binutils-{t}" for t in cross]
    return " ".join([_APT, *packages, _TOOLS])
