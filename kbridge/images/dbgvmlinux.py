"""An image kernel's vmlinux with DWARF, for gdb: streamed out of Debian's linux-image-KREL-dbg."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from kbridge import progress
from kbridge.errors import KbridgeError
from kbridge.images.apt import Mirrors, PrivateApt, mirrors_from_env
from kbridge.images.image import Image
from kbridge.paths import cache_dir


def fetch_dbg_vmlinux(img: Image, mirrors: Mirrors | None = None) -> Path:
    """IMG's vmlinux with DWARF, from Debian's linux-image-KREL-dbg (~860 MB for 6.1: only vmlinux is
    unpacked, streamed out of the package), into the image's gdb/ directory."""
    import tarfile

    dest = img.dir / "gdb" / "vmlinux"
    if dest.is_file():
        return dest
    package = f"linux-image-{img.krel}-dbg"
    apt = PrivateApt(
        cache_dir() / "apt" / f"{img.suite}-{img.arch.debian}",
        img.suite,
        img.arch.debian,
        mirrors or mirrors_from_env(img.suite),
    )
    with progress.step(f"reading Debian {img.suite} package lists ({img.arch.debian})"):
        apt.update()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with progress.step(f"downloading {package} ({apt.version(package)})"):
            (deb,) = apt.download([package], Path(tmp))
        with progress.step(f"unpacking its vmlinux into {dest.parent}"):
            proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            found = False
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith((f"/boot/vmlinux-{img.krel}", f"/{img.krel}/vmlinux")):
                        src = tar.extractfile(member)
                        assert src is not None
                        part = Path(tmp) / "vmlinux"
                        with part.open("wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
                        part.rename(dest)
                        found = True
                        break
            proc.stdout.close()
            proc.kill()
            proc.wait()
    if not found:
        raise KbridgeError(f"{package} has no vmlinux (unexpected layout)")
    return dest
