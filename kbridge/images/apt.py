"""A private apt state per suite and architecture: reads Debian's archive, never touches the host.

No `dpkg --add-architecture`, no /etc/apt changes: lists, caches and the (empty)
dpkg status live under kbridge's cache directory and are passed to apt with -o.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kbridge.errors import KbridgeError

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_LIST_MAX_AGE_S = 24 * 3600
UNRELEASED = frozenset({"sid", "unstable"})


@dataclass(frozen=True)
class Mirrors:
    """Where Debian packages come from: the main archive and the security archive."""

    main: str = DEFAULT_MIRROR
    security: str = DEFAULT_SECURITY


def host_mirrors(suite: str, sources: Path = Path("/etc/apt")) -> Mirrors:
    """The Debian mirrors the host's apt sources already use for SUITE, else the defaults.

    Reads both one-line (.list) and deb822 (.sources) files; only http(s)/file URIs
    of entries that name SUITE or SUITE-security count.
    """
    main = security = None
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for uris, suites in _entries(text, f.suffix == ".sources"):
            for uri in uris:
                if suite + "-security" in suites and not security:
                    security = uri
                elif suite in suites and not main:
                    main = uri
    return Mirrors(main or DEFAULT_MIRROR, security or DEFAULT_SECURITY)


def mirrors_from_env(suite: str) -> Mirrors:
    """The mirrors for SUITE: KBRIDGE_MIRROR and KBRIDGE_SECURITY_MIRROR, else the host's (host_mirrors)."""
    found = host_mirrors(suite)
    return Mirrors(
        os.environ.get("KBRIDGE_MIRROR", found.main),
        os.environ.get("KBRIDGE_SECURITY_MIRROR", found.security),
    )


def _entries(text: str, deb822: bool) -> list[tuple[list[str], list[str]]]:
    out = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, v in (ln.split(":", 1) for ln in stanza.splitlines() if ":" in ln and not ln.startswith("#"))
            )
            if "deb" in fields.get("types", "").split():
                out.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
    else:
        for raw in text.splitlines():
            ln = re.sub(r"\[[^]]*\]", "", raw.split("#", 1)[0]).split()
            if len(ln) >= 3 and ln[0] == "deb":
                out.append(([ln[1]], [ln[2]]))
    return [(u, s) for u, s in out if any(x.startswith(("http://", "https://", "file:")) for x in u)]


class FetchError(KbridgeError):
    """The archive lists a package that its pool does not serve (HTTP 404 and the like)."""


class PrivateApt:
    """apt-get/apt-cache over a private state directory for one suite and Debian architecture."""

    def __init__(self, root: Path, suite: str, debian_arch: str, mirrors: Mirrors, security: bool = True) -> None:
        self.root = root
        self.security = security
        self.suite = suite
        self.arch = debian_arch
        self.mirrors = mirrors
        if not shutil.which("apt-get"):
            raise KbridgeError(
                "apt-get was not found: kbridge builds guest images from Debian packages",
                "run kbridge on a Debian or Ubuntu host (kbridge doctor lists what is needed)",
            )
        if not KEYRING.exists():
            raise KbridgeError(
                f"Debian's archive keyring {KEYRING} is missing",
                "install it: sudo apt-get install debian-archive-keyring",
            )

    def _options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::State": r / "state",
            "Dir::State::Lists": r / "state/lists",
            "Dir::State::status": r / "state/status",
            "Dir::Cache": r / "cache",
            "Dir::Cache::archives": r / "cache/archives",
            "Dir::Etc::SourceList": r / "sources.list",
            "Dir::Etc::SourceParts": r / "sources.list.d",
            "Dir::Etc::Preferences": r / "preferences",
            "Dir::Etc::PreferencesParts": r / "preferences.d",
            "APT::Architecture": self.arch,
            "APT::Architectures": self.arch,
            "Debug::NoLocking": "1",
            "Acquire::Languages": "none",
        }
        if os.geteuid() == 0:
            opts["APT::Sandbox::User"] = "root"  # the cache is root's; _apt could not write it
        return [f"-o{k}={v}" for k, v in opts.items()]

    def _prepare(self) -> None:
        for d in ("state/lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "state/status").touch()
        opts = f"[arch={self.arch} signed-by={KEYRING}]"
        lines = [f"deb {opts} {self.mirrors.main} {self.suite} main"]
        # sid has no -updates or -security suites (an apt-get update asking for them fails);
        # the released suites get their current kernels from -security (bullseye's only there).
        if self.suite not in UNRELEASED:
            lines.append(f"deb {opts} {self.mirrors.main} {self.suite}-updates main")
            if self.security:
                lines.append(f"deb {opts} {self.mirrors.security} {self.suite}-security main")
        (self.root / "sources.list").write_text("\n".join(lines) + "\n")

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        return self._proc(tool, *args, cwd=cwd).stdout

    def _proc(self, tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = [tool, "-q", *self._options(), *args]
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("W:"))
            failed = [ln for ln in err.splitlines() if "Failed to fetch" in ln]
            # A security pocket the mirror does not carry for this arch (seen: bullseye-security's
            # armhf index, 404) is the same case as its pool's 404s: the point release still boots.
            security_only = bool(failed) and all(f"/dists/{self.suite}-security/" in ln for ln in failed)
            if failed and tool == "apt-get" and (args[:1] != ("update",) or security_only):
                raise FetchError(
                    f"Debian {self.suite}/{self.arch}: the archive lists packages it cannot serve:\n{err.strip()}",
                    f"try another mirror with --mirror or KBRIDGE_MIRROR (now {self.mirrors.main})",
                )
            raise KbridgeError(
                f"{tool} {' '.join(args)} failed ({self.suite}/{self.arch}):\n{err.strip()}",
                f"check the mirror {self.mirrors.main} (override with --mirror or KBRIDGE_MIRROR)",
            )
        return proc

    def update(self, force: bool = False) -> None:
        """Fetch the package lists, at most once a day unless forced."""
        self._prepare()
        stamp = self.root / "state/updated"
        if not force and stamp.exists() and time.time() - stamp.stat().st_mtime < _LIST_MAX_AGE_S:
            return
        proc = self._proc("apt-get", "update")
        if err := update_error(proc.stderr, self.suite, self.arch):
            raise err
        stamp.touch()

    def depends(self, package: str) -> list[str]:
        """Direct Depends of PACKAGE (used to follow metapackages such as linux-image-arm64)."""
        out = self._run("apt-cache", "depends", "--no-recommends", "--no-suggests", package)
        return re.findall(r"^\s+Depends: ([^\s<>]+)", out, re.M)

    def version(self, package: str) -> str:
        out = self._run("apt-cache", "show", "--no-all-versions", package)
        m = re.search(r"^Version: (\S+)", out, re.M)
        if not m:
            raise KbridgeError(f"package {package!r} not found in {self.suite}/{self.arch}")
        return m.group(1)

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """Download exactly PACKAGES (no dependencies) into DEST."""
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        self._run("apt-get", "download", *packages, cwd=dest)
        return sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob("*.deb"))

    def download_closure(self, packages: list[str], dest: Path) -> list[Path]:
        """Download PACKAGES and all they depend on (as if installing on an empty system) into DEST."""
        (dest / "partial").mkdir(parents=True, exist_ok=True)
        self._run(
            "apt-get",
            "install",
            "-y",
            "--download-only",
            "--no-install-recommends",
            f"-oDir::Cache::archives={dest}",
            *packages,
        )
        return sorted(dest.glob("*.deb"))


def update_error(stderr: str, suite: str, arch: str) -> KbridgeError | None:
    """The error for an `apt-get update` that exited 0 but could not reach a source.

    apt only warns ("W: Failed to fetch"); building from the other pockets alone
    would fail later, less clearly. When only the security archive is unreachable
    the error is a FetchError, which image builds answer by building without it.
    """
    failed = [ln for ln in stderr.splitlines() if ln.startswith("W: Failed to fetch")]
    if not failed:
        return None
    cls = FetchError if all("-security" in ln for ln in failed) else KbridgeError
    return cls(
        f"cannot read Debian {suite} ({arch}) package lists: {failed[0].removeprefix('W: ')}",
        "check the mirror and the network (--mirror or KBRIDGE_MIRROR)",
    )


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files into DEST (dpkg-deb -x: no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KbridgeError(f"could not unpack {deb.name}: {proc.stderr.strip()}")
