"""Finding a Vagrant machine: `vagrant ssh-config` / `vagrant status` of a Vagrantfile, and what is missing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

from kbridge.errors import KbridgeError
from kbridge.paths import state_dir

INSTALL_HINT = "sudo apt-get install vagrant vagrant-libvirt"
NO_VAGRANTFILE_HINT = "cd to the directory with the Vagrantfile, or pass --vagrantfile DIR (or set VAGRANT_CWD)"


def environment(vagrantfile_dir: Path | str | None = None) -> tuple[dict[str, str], str]:
    """Vagrant's environment for the Vagrantfile in VAGRANTFILE_DIR, VAGRANT_CWD or the current
    directory, and how to name that place in messages."""
    if shutil.which("vagrant") is None:
        raise KbridgeError("vagrant is not installed", INSTALL_HINT)
    if shutil.which("ssh") is None:
        raise KbridgeError(
            "ssh is not installed (kbridge drives Vagrant machines over OpenSSH)", "sudo apt-get install openssh-client"
        )
    env = dict(os.environ)
    if vagrantfile_dir is not None:
        if not (Path(vagrantfile_dir) / "Vagrantfile").is_file():
            raise KbridgeError(
                f"no Vagrantfile in {str(vagrantfile_dir)!r}", "give the directory that holds the Vagrantfile"
            )
        env["VAGRANT_CWD"] = str(Path(vagrantfile_dir).resolve())
        return env, str(vagrantfile_dir)
    if env.get("VAGRANT_CWD"):
        return env, env["VAGRANT_CWD"]
    env.pop("VAGRANT_CWD", None)  # set but empty: Vagrant would refuse it
    return env, "the current directory"


def ssh_options(ssh_config: str, machine: str) -> list[str]:
    """`vagrant ssh-config MACHINE`'s Host block as ssh -o options (no config file to leave behind)."""
    block = host_block(ssh_config, machine) or ssh_config
    opts: list[str] = []
    for line in block.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and value and key.lower() != "host":
            opts += ["-o", f"{key} {value.strip()}"]
    return opts


def running_machine(env: dict[str, str], where: str) -> str:
    """The one machine of the Vagrantfile that runs (`--target vagrant` without a name)."""
    status = vagrant_cmd(["status", "--machine-readable"], env)
    if status.returncode != 0:
        _status_failed(status, None, env, where)
    machines = parse_status(status.stdout)
    running = [m for m, (state, _) in machines.items() if state == "running"]
    if len(running) == 1:
        return running[0]
    names = ", ".join(f"vagrant:{n}" for n in (running or machines))
    if running:
        raise KbridgeError(f"several machines of the Vagrantfile in {where} are running", f"name one: --target {names}")
    raise KbridgeError(
        f"no machine of the Vagrantfile in {where} is running",
        f"vagrant up NAME, then --target vagrant (or name one: --target {names})",
    )


def _arch_file() -> Path:
    return state_dir() / "vagrant-arches.json"


def _machine_id(env: dict[str, str], machine: str) -> str:
    """The id of MACHINE's current incarnation (Vagrant writes it when it creates the machine)."""
    for p in sorted((dotdir(env) / "machines" / machine).glob("*/id")):
        with contextlib.suppress(OSError):
            return p.read_text().strip()
    return ""


def remember_arch(env: dict[str, str], machine: str, arch: str) -> None:
    """What arch MACHINE is, kept until the machine is created again (a new id)."""
    key = f"{dotdir(env).resolve()}:{machine}:{_machine_id(env, machine)}"
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(_arch_file().read_text()) if _arch_file().is_file() else {}
        if known.get(key) != arch:
            known[key] = arch
            _arch_file().parent.mkdir(parents=True, exist_ok=True)
            tmp = _arch_file().with_suffix(f".{os.getpid()}")
            tmp.write_text(json.dumps(known))
            tmp.replace(_arch_file())


def known_arch(env: dict[str, str], machine: str) -> str | None:
    """MACHINE's arch as a connection found it, if this incarnation of it was seen before."""
    key = f"{dotdir(env).resolve()}:{machine}:{_machine_id(env, machine)}"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_arch_file().read_text()).get(key)
    return None


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


def _status_failed(
    status: subprocess.CompletedProcess[str], machine: str | None, env: dict[str, str], where: str
) -> NoReturn:
    msg = vagrant_message(status)
    if "provider" in msg.lower() and "libvirt" in msg and plugin_missing(env):
        raise KbridgeError(f"the vagrant-libvirt plugin is missing: {msg}", INSTALL_HINT)
    if "not found configured" in msg or "was not found" in msg:
        raise KbridgeError(
            f"no machine {machine!r} in the Vagrantfile of {where}: {msg}", "see `vagrant status` for the machine names"
        )
    if "A Vagrant environment or target machine is required" in msg:
        raise KbridgeError(f"no Vagrantfile in {where}", NO_VAGRANTFILE_HINT)
    raise KbridgeError(f"vagrant status failed: {msg}")


def explain_not_ready(machine: str | None, env: dict[str, str], where: str, ssh_config_error: str) -> NoReturn:
    """Raise the one-line reason a machine cannot be reached: no Vagrantfile, no such machine,
    a missing plugin, not created, not running."""
    status = vagrant_cmd(["status", "--machine-readable", *([machine] if machine else [])], env)
    if status.returncode != 0:
        _status_failed(status, machine, env, where)
    machines = parse_status(status.stdout)
    if machine is None:
        machine = running_machine(env, where)
    state, provider = machines.get(machine, ("", ""))
    if provider == "libvirt" and plugin_missing(env):
        raise KbridgeError(f"the vagrant-libvirt plugin is missing (the provider of {machine})", INSTALL_HINT)
    if state != "running":
        why = {"not_created": "not created", "shutoff": "shut off", "": "in an unknown state"}.get(state, state)
        raise KbridgeError(f"vagrant machine {machine!r} is {why}", f"vagrant up {machine}")
    raise KbridgeError(f"vagrant ssh-config {machine} failed: {ssh_config_error}", f"vagrant reload {machine}")


def readiness() -> list[dict]:
    """`kbridge doctor`'s Vagrant checks (all optional): vagrant, the libvirt plugin, libvirtd, boxes."""
    from kbridge.arch import ARCHES
    from kbridge.images import box as boxes
    from kbridge.images import vagrantboxes

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
    added = vagrantboxes.added_boxes()
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
