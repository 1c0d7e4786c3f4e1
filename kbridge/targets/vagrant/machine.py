"""Finding a Vagrant machine: `vagrant ssh-config` / `vagrant status` of a Vagrantfile, and what is missing."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

from kbridge.errors import KbridgeError

INSTALL_HINT = "sudo apt-get install vagrant vagrant-libvirt"


def vagrant_cmd(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["vagrant", *args], capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise KbridgeError(f"`vagrant {' '.join(args)}` did not answer within {timeout:.0f} s") from None


def vagrant_message(proc: subprocess.CompletedProcess[str]) -> str:
    """Vagrant's own error text, on one line."""
    text = proc.stderr.strip() or proc.stdout.strip()
    for line in proc.stdout.splitlines():  # --machine-readable puts errors in error-exit rows
        parts = line.split(",", 4)
        if len(parts) == 5 and parts[2] == "error-exit":
            text = parts[4].replace("\\n", " ")
    return " ".join(text.split())[:400]


def parse_status(text: str) -> dict[str, tuple[str, str]]:
    """`vagrant status --machine-readable` -> {machine: (state, provider)}."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split(",", 3)
        if len(parts) < 4 or not parts[1]:
            continue
        entry = found.setdefault(parts[1], ["", ""])
        if parts[2] == "state":
            entry[0] = parts[3]
        elif parts[2] == "provider-name" or (parts[2] == "metadata" and parts[3].startswith("provider,")):
            entry[1] = parts[3].split(",")[-1]
    return {k: (v[0], v[1]) for k, v in found.items()}


def plugin_missing(env: dict[str, str]) -> bool:
    proc = vagrant_cmd(["plugin", "list"], env, timeout=60)
    return "vagrant-libvirt" not in proc.stdout


def host_block(ssh_config: str, host: str) -> str:
    """The `Host HOST` block of an ssh-config text."""
    m = re.search(rf"^Host {re.escape(host)}\n(?:(?!Host ).*\n?)*", ssh_config, re.M)
    return m.group(0) if m else ""


def dotdir(env: dict[str, str]) -> Path:
    """Where Vagrant keeps the machines' state (.vagrant beside the Vagrantfile)."""
    if env.get("VAGRANT_DOTFILE_PATH"):
        return Path(env["VAGRANT_DOTFILE_PATH"])
    return Path(env.get("VAGRANT_CWD") or os.getcwd()) / ".vagrant"


def provider_of(env: dict[str, str], machine: str) -> str:
    """The provider that created MACHINE (.vagrant/machines/NAME/PROVIDER/id)."""
    with contextlib.suppress(OSError):
        for p in sorted((dotdir(env) / "machines" / machine).iterdir()):
            if (p / "id").is_file():
                return p.name
    return "vagrant"


def explain_not_ready(machine: str | None, env: dict[str, str], where: str, ssh_config_error: str) -> NoReturn:
    """Raise the one-line reason a machine cannot be reached: no Vagrantfile, no such machine,
    a missing plugin, not created, not running."""
    status = vagrant_cmd(["status", "--machine-readable", *([machine] if machine else [])], env)
    if status.returncode != 0:
        msg = vagrant_message(status)
        if "provider" in msg.lower() and "libvirt" in msg and plugin_missing(env):
            raise KbridgeError(f"the vagrant-libvirt plugin is missing: {msg}", INSTALL_HINT)
        if "not found configured" in msg or "was not found" in msg:
            raise KbridgeError(
                f"no machine {machine!r} in the Vagrantfile of {where}: {msg}",
                "see `vagrant status` for the machine names",
            )
        if "A Vagrant environment or target machine is required" in msg:
            raise KbridgeError(
                f"no Vagrantfile in {where}",
                "cd to the directory with the Vagrantfile, or pass --vagrantfile DIR / set VAGRANT_CWD",
            )
        raise KbridgeError(f"vagrant status failed: {msg}")
    machines = parse_status(status.stdout)
    if machine is None:
        if len(machines) != 1:
            names = ", ".join(f"vagrant:{n}" for n in machines)
            raise KbridgeError(
                f"no machine of the Vagrantfile in {where} is running",
                f"vagrant up, then --target vagrant (or name one: --target {names})",
            )
        machine = next(iter(machines))
    state, provider = machines.get(machine, ("", ""))
    if provider == "libvirt" and plugin_missing(env):
        raise KbridgeError(f"the vagrant-libvirt plugin is missing (the provider of {machine})", INSTALL_HINT)
    if state != "running":
        why = {"not_created": "not created", "shutoff": "shut off", "": "in an unknown state"}.get(state, state)
        raise KbridgeError(f"vagrant machine {machine!r} is {why}", f"vagrant up {machine}")
    raise KbridgeError(f"vagrant ssh-config {machine} failed: {ssh_config_error}", f"vagrant reload {machine}")


# A root shell kept open over one SSH channel runs run()'s commands: no sudo, PAM or
# login-shell start per command (under TCG those cost ~0.5-1 s each). Commands run one
# at a time; each is framed by a random marker the host chose, its stdout goes straight
# to the channel (as qemu-guest-agent's exec output does, so the only writes are the
# command's own), stderr through a file.


def readiness() -> list[dict]:
    """`kbridge doctor`'s Vagrant checks (all optional): vagrant, the libvirt plugin, libvirtd, boxes."""
    from kbridge.arch import ARCHES
    from kbridge.images import box as boxes

    def row(check: str, ok: bool, detail: str) -> dict:
        return {"check": check, "ok": ok, "detail": detail, "package": None, "optional": True}

    if shutil.which("vagrant") is None:
        return [row("vagrant", False, f"not installed (for --target vagrant:NAME): {INSTALL_HINT}")]
    env = dict(os.environ)
    version = vagrant_cmd(["--version"], env, timeout=60).stdout.strip()
    res = [row("vagrant", True, version or "installed")]
    plugins = vagrant_cmd(["plugin", "list"], env, timeout=60).stdout
    m = re.search(r"vagrant-libvirt \(([^)]*)\)", plugins)
    res.append(row("vagrant-libvirt", bool(m), m.group(1) if m else f"plugin missing: {INSTALL_HINT}"))
    sock = Path("/run/libvirt/libvirt-sock")
    if shutil.which("virsh"):
        proc = subprocess.run(
            ["virsh", "-c", "qemu:///system", "version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        first = (proc.stdout or proc.stderr).strip().splitlines()
        res.append(
            row(
                "libvirtd",
                proc.returncode == 0,
                first[0]
                if proc.returncode == 0 and first
                else f"qemu:///system does not answer ({' '.join(first)[:120]}): start libvirtd "
                "(sudo systemctl start libvirtd) and join the libvirt group",
            )
        )
    else:
        res.append(row("libvirtd", sock.exists(), "install libvirt-daemon-system libvirt-clients"))
    added = boxes.added_boxes()
    for a in ARCHES.values():
        if a.box_refusal:
            continue  # no box is built for it (32-bit arm): nothing to report
        box = boxes.load(a)
        name = boxes.box_name(a)
        if box is None:
            res.append(row(f"box {name}", False, f"not built: kbridge box build --arch {a.name}"))
        else:
            ok = box.version in added.get(name, [])
            res.append(
                row(
                    f"box {name}",
                    ok,
                    f"{box.krel}, version {box.version}"
                    + ("" if ok else f", not added to Vagrant: kbridge box build --arch {a.name}"),
                )
            )
    return res
