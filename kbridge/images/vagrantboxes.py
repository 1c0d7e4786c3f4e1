"""kbridge's boxes in Vagrant and in libvirt's storage pool: adding a built box, listing, removing.

A box is added through a catalog kept in its cache directory (how a box gets a version
without a server). vagrant-libvirt copies a box's disk into libvirt's storage pool on the
first `vagrant up` and `vagrant box remove` leaves it there: removing takes both, and only
what no machine uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from kbridge.arch import Arch
from kbridge.errors import KbridgeError
from kbridge.images.box import Box, box_dir, box_name, load
from kbridge.images.image import DEFAULT_SUITE


def vagrant_add(box: Box) -> None:
    """`vagrant box add` BOX under its name and version, unless Vagrant already has it.

    Added through a catalog (metadata JSON naming the .box archive), which is how a box
    gets a version without a server. The catalog stays in the box's cache directory:
    Vagrant reads it again on every `vagrant up` (its update check), so a catalog that
    was only temporary would make each later `vagrant up` warn that it cannot open it.
    """
    if shutil.which("vagrant") is None:
        raise KbridgeError("vagrant is not installed", "sudo apt-get install vagrant vagrant-libvirt")
    catalog = box.dir / "catalog.json"
    if box.version in added_boxes().get(box.name, []):
        _keep_catalog(box, catalog)
        return
    with tempfile.TemporaryDirectory(prefix="kbridge-box-", dir=box.dir) as tmp:
        archive = Path(tmp) / f"{box.dir.name}.box"
        with tarfile.open(archive, "w") as tar:
            for f in ("metadata.json", "Vagrantfile", "box.img", "kernel", "initrd"):
                tar.add(box.dir / f, arcname=f)
        _write_catalog(box, catalog, archive)
        proc = subprocess.run(
            ["vagrant", "box", "add", "--provider", "libvirt", str(catalog)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    if proc.returncode != 0:
        why = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise KbridgeError(f"vagrant box add {box.name} failed: {why}")


def _write_catalog(box: Box, catalog: Path, archive: Path) -> None:
    # The archive is gone once added: Vagrant needs it only to download a version it lacks, and
    # kbridge adds every version it builds.
    entry = {"version": box.version, "providers": [{"name": "libvirt", "url": archive.as_uri()}]}
    catalog.write_text(json.dumps({"name": box.name, "versions": [entry]}))


def vagrant_home() -> Path:
    return Path(os.environ.get("VAGRANT_HOME") or Path.home() / ".vagrant.d")


def _keep_catalog(box: Box, catalog: Path) -> None:
    """A box added before its catalog was kept (Vagrant's record points at a vanished temporary one):
    point that record at the cache's catalog."""
    record = vagrant_home() / "boxes" / box.name.replace("/", "-VAGRANTSLASH-") / "metadata_url"
    try:
        url = record.read_text().strip()
    except OSError:
        return
    if url == str(catalog) and catalog.is_file():
        return
    if not Path(url.removeprefix("file://")).is_file():
        _write_catalog(box, catalog, box.dir / f"{box.dir.name}.box")
        record.write_text(str(catalog))


def added_boxes() -> dict[str, list[str]]:
    """Boxes Vagrant knows (in VAGRANT_HOME): name -> versions; empty when vagrant is missing."""
    if shutil.which("vagrant") is None:
        return {}
    proc = subprocess.run(
        ["vagrant", "box", "list", "--machine-readable"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    found: dict[str, list[str]] = {}
    names: list[str] = []
    versions: list[str] = []
    for line in proc.stdout.splitlines():
        parts = line.split(",", 3)
        if len(parts) == 4 and parts[2] == "box-name":
            names.append(parts[3])
        elif len(parts) == 4 and parts[2] == "box-version":
            versions.append(parts[3])
    for name, version in zip(names, versions, strict=False):
        found.setdefault(name, []).append(version)
    return found


# -- removing boxes ----------------------------------------------------------------------
# vagrant-libvirt copies a box's disk into libvirt's storage pool on the first `vagrant up`
# (volume NAME_vagrant_box_image_VERSION_box.img) and `vagrant box remove` leaves it there:
# kbridge removes both, and only what no machine uses (Vagrant refuses a box in use).

POOL = "default"  # vagrant-libvirt's storage_pool_name


def _virsh(*args: str) -> subprocess.CompletedProcess[str]:
    uri = os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def box_volumes(name: str) -> dict[str, str]:
    """libvirt's volumes of box NAME in vagrant-libvirt's pool: volume -> box version."""
    if shutil.which("virsh") is None:
        return {}
    proc = _virsh("vol-list", POOL)
    prefix = name.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"
    found = {}
    for line in proc.stdout.splitlines():
        vol = line.split()[0] if line.split() else ""
        if vol.startswith(prefix):
            found[vol] = vol[len(prefix) :].rsplit("_", 1)[0]
    return found


def remove_version(name: str, version: str | None) -> list[str]:
    """Remove VERSION (None: every version) of box NAME from Vagrant, then its libvirt volumes.

    What was done, one phrase each. A version a machine still uses is refused by
    Vagrant: KbridgeError, with its volume left in place.
    """
    done: list[str] = []
    known = added_boxes().get(name, [])
    wanted = [v for v in ([version] if version else known) if v in known]
    users = [m for m in machines_using(name) if version is None or m[1] == version]
    if users:
        machine, v, where = users[0]
        raise KbridgeError(
            f"{name} {v} is used by the Vagrant machine {machine!r} ({where}): nothing removed",
            f"vagrant destroy {machine} (in {where}) first",
        )
    for v in wanted:
        proc = subprocess.run(
            ["vagrant", "box", "remove", name, "--box-version", v, "--provider", "libvirt", "--force"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise KbridgeError(f"vagrant box remove {name} {v} failed: {' '.join(proc.stderr.split())[-300:]}")
        done.append(f"Vagrant's {name} {v}")
    left = set(added_boxes().get(name, []))
    for vol, v in box_volumes(name).items():
        if (version is None or v == version) and v not in left:
            proc = _virsh("vol-delete", "--pool", POOL, vol)
            if proc.returncode != 0:
                raise KbridgeError(f"libvirt kept the volume {vol}: {proc.stderr.strip()[-300:]}")
            done.append(f"libvirt's volume {vol}")
    return done


def machines_using(name: str) -> list[tuple[str, str, str]]:
    """Vagrant machines made from box NAME, from Vagrant's machine index: (machine, version, directory)."""
    try:
        index = json.loads((vagrant_home() / "data/machine-index/index").read_text())
    except (OSError, ValueError):
        return []
    found = []
    for m in (index.get("machines") or {}).values():
        b = (m.get("extra_data") or {}).get("box") or {}
        if b.get("name") == name:
            found.append((str(m.get("name")), str(b.get("version")), str(m.get("vagrantfile_path"))))
    return found


def remove(arch: Arch, suite: str = DEFAULT_SUITE, bcc: bool = False, keep_cache: bool = False) -> list[str]:
    """Box ARCH (every version) out of Vagrant, libvirt's pool and (unless KEEP_CACHE) kbridge's cache."""
    name = box_name(arch, suite, bcc)
    done = remove_version(name, None)
    d = box_dir(arch, suite, bcc)
    if not keep_cache and d.exists():
        shutil.rmtree(d)
        done.append(f"the build in {d}")
    return done


def prune() -> list[str]:
    """Every version of kbridge's boxes but the one built now, out of Vagrant and libvirt's pool."""
    from kbridge.arch import ARCHES

    done: list[str] = []
    for arch in ARCHES.values():
        for bcc in (False, True):
            name = box_name(arch, DEFAULT_SUITE, bcc)
            current = load(arch, DEFAULT_SUITE, bcc)
            versions = set(added_boxes().get(name, [])) | set(box_volumes(name).values())
            for v in sorted(versions - {current.version if current else ""}):
                done += remove_version(name, v)
    return done
