"""`kbridge doctor`: what the host has and lacks for each arch, and the command that fixes it."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Annotated

import typer

from kbridge.arch import ARCHES, host_arch
from kbridge.cli import app
from kbridge.cli.options import JsonDocOpt
from kbridge.cli.output import command, emit_json, err
from kbridge.images import image as images
from kbridge.images.apt import KEYRING
from kbridge.targets import kvm_check, strays, vagrant_readiness


def _sandbox_row() -> dict:
    """Whether `kbridge lab check` can build a student's module: only in the bubblewrap sandbox."""
    from kbridge import sandbox

    try:
        box = sandbox.detect()
        ok, detail = True, f"{box.version or 'bwrap'}, mode {box.mode}: lab check builds submissions in it"
    except sandbox.SandboxError as e:
        ok, detail = False, e.message
    return {"check": "sandbox (bwrap)", "ok": ok, "detail": detail, "package": "bubblewrap"}


def _debug_kernel_rows() -> list[dict]:
    """What building the debug kernel (--kernel debug) needs beyond a module build."""
    from pathlib import Path

    from kbridge.images import debugkernel

    why = "builds the debug kernel (--kernel debug)"
    rows = [
        {"check": t, "ok": bool(shutil.which(t)), "detail": shutil.which(t) or f"missing: {why}", "package": pkg}
        for t, pkg in debugkernel.HOST_TOOLS.items()
        if t != "make"
    ]
    rows += [
        {"check": pkg, "ok": Path(h).is_file(), "detail": h if Path(h).is_file() else f"missing: {why}", "package": pkg}
        for h, pkg in debugkernel.HOST_HEADERS.items()
    ]
    return rows


def checks() -> list[dict]:
    """Each check: name, ok, detail, and the apt package that provides it."""

    def tool(name: str, pkg: str, why: str) -> dict:
        path = shutil.which(name)
        return {"check": name, "ok": bool(path), "detail": path or f"missing: {why}", "package": pkg}

    res = [
        tool("apt-get", "apt", "downloads Debian kernels and guest packages"),
        tool("dpkg-deb", "dpkg", "unpacks them"),
        tool("make", "make", "kbuild"),
        tool("mkfs.ext4", "e2fsprogs", "builds the bcc image's root filesystem (the three-ways lab)"),
        tool("clang", "clang", "compiles kbridge's eBPF probe (--via bpf) on the host, once per guest kernel"),
        {
            "check": "bpftool",
            "ok": (path := shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")) is not None,
            "detail": path or "missing: makes vmlinux.h from a guest kernel's BTF (--via bpf)",
            "package": "bpftool",
        },
        tool("mmdebstrap", "mmdebstrap", "makes the build roots of newer kernels (--kernel 6.12, latest)"),
        tool("zstd", "zstd", "compresses the saved state a VM starts from (without it every start boots)"),
        tool("gdb-multiarch", "gdb-multiarch", "kbridge gdb"),
        *_debug_kernel_rows(),
        _sandbox_row(),
        {
            "check": "debian-archive-keyring",
            "ok": KEYRING.exists(),
            "detail": str(KEYRING),
            "package": "debian-archive-keyring",
        },
    ]
    for a in ARCHES.values():
        res.append(tool(a.qemu_binary, a.qemu_package, f"runs {a.name} guests"))
        res.append(
            tool(
                a.gcc(12),
                a.gcc_package(12),
                f"builds {a.name} modules for 5.10 and 6.1 (newer kernels bring a build root)",
            )
        )
        res.append(tool(f"{a.cross_compile()}objcopy", a.binutils_package(), f"strips {a.name} modules for the guest"))
    kvm_ok, why = kvm_check(ARCHES[host_arch()]) if host_arch() in ARCHES else (False, "unknown host arch")
    res.append(
        {
            "check": "kvm",
            "ok": kvm_ok,
            "detail": "will be tried (bounded), TCG otherwise" if kvm_ok else f"TCG will be used: {why}",
            "package": None,
            "optional": True,
        }
    )
    from kbridge.images import debugkernel

    for a in ARCHES.values():
        img = images.load(a, verify=False)
        res.append(
            {
                "check": f"image {a.name}",
                "ok": img is not None,
                "optional": True,
                "package": None,
                "detail": f"cached: {img.krel}" if img else "not built yet (built on first use, ~20 s)",
            }
        )
        dbg = debugkernel.load(a)
        res.append(
            {
                "check": f"debug kernel {a.name}",
                "ok": dbg is not None,
                "optional": True,
                "package": None,
                "detail": f"cached: {dbg.krel}"
                if dbg
                else f"not built yet (kbridge image build --kernel debug --arch {a.name}: ~13 min)",
            }
        )
    found = strays()
    res.append(
        {
            "check": "stray qemu",
            "ok": True,
            "optional": True,
            "package": None,
            "detail": f"kbridge QEMU processes running: {found}" if found else "none",
        }
    )
    res += vagrant_readiness()  # Vagrant: optional checks
    return res


@app.command("doctor")
@command
def doctor(
    json_out: JsonDocOpt = False,
    fix: Annotated[bool, typer.Option("--fix", help="Install what is missing with apt-get (needs root).")] = False,
) -> None:
    """Check the host: tools, compilers, QEMU, KVM, cached images."""
    res = checks()
    missing = sorted({c["package"] for c in res if not c["ok"] and c.get("package")})
    if fix and missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "install", "-y", *missing], check=False)
        res = checks()
        missing = sorted({c["package"] for c in res if not c["ok"] and c.get("package")})
    if json_out:
        emit_json({"checks": res, "missing_packages": missing, "ok": not missing})
    else:
        for c in res:
            mark = "[green]✓[/]" if c["ok"] else ("[yellow]-[/]" if c.get("optional") else "[red]✗[/]")
            err.print(f"{mark} {c['check']:28} {c['detail']}")
        if missing:
            err.print(f"\n[bold]install:[/] sudo apt-get install {' '.join(missing)}")
    if missing:
        raise typer.Exit(1)
