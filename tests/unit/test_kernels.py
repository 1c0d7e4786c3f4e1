"""The kernel matrix: --kernel values, per-suite package layouts and toolchains (pure code)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbridge import kernels
from kbridge.arch import get_arch
from kbridge.errors import KbridgeError
from kbridge.images import buildroot, image, kconfig, kernelpkgs, modtree
from kbridge.images.apt import Mirrors, PrivateApt
from kbridge.kbuild import kbuild_argv, uses_build_root


@pytest.mark.parametrize(
    ("text", "suite"),
    [
        (None, "bookworm"),
        ("bullseye", "bullseye"),
        ("5.10", "bullseye"),
        ("6.1", "bookworm"),
        ("6.12", "trixie"),
        ("trixie", "trixie"),
        ("latest", "sid"),
        ("sid", "sid"),
        ("unstable", "sid"),
        (" Bookworm ", "bookworm"),
    ],
)
def test_resolve(text, suite):
    assert kernels.resolve(text) == suite


@pytest.mark.parametrize("bad", ["5.4", "6", "buster", "", "6.12; rm -rf /"])
def test_resolve_rejects_with_the_choices(bad):
    with pytest.raises(KbridgeError) as info:
        kernels.resolve(bad)
    assert repr(bad) in info.value.message
    assert "bullseye|5.10" in info.value.message and "sid|latest" in info.value.message


def test_table():
    assert list(kernels.SUITES) == ["bullseye", "bookworm", "trixie", "sid"]
    assert [s.name for s in kernels.SUITES.values() if s.host_gcc] == ["bullseye", "bookworm"]
    assert kernels.get("6.12").label == "trixie (6.12)"


@pytest.mark.parametrize(
    ("krel", "version"),
    [
        ("5.10.0-46-amd64", (5, 10)),
        ("6.1.0-56-arm64", (6, 1)),
        ("6.12.118+deb13-amd64", (6, 12)),
        ("7.2.13+deb14-arm64", (7, 2)),
    ],
)
def test_version_tuple(krel, version):
    assert kernels.version_tuple(krel) == version


# sid's (7.2) headers Makefile as shipped: an absolute KBUILD_OUTPUT and include.
SID_MAKEFILE = (
    "KBUILD_OUTPUT=/usr/src/linux-headers-7.2.13+deb14-amd64\n"
    "include /usr/src/linux-headers-7.2.13+deb14-common/Makefile\n"
)
BOOKWORM_MAKEFILE = "include /usr/src/linux-headers-6.1.0-56-common/Makefile\n"


@pytest.mark.parametrize(
    ("krel", "text", "fixed"),
    [
        (
            "7.2.13+deb14-amd64",
            SID_MAKEFILE,
            "KBUILD_OUTPUT := $(CURDIR)\ninclude ../linux-headers-7.2.13+deb14-common/Makefile\n",
        ),
        ("6.1.0-56-amd64", BOOKWORM_MAKEFILE, "include ../linux-headers-6.1.0-56-common/Makefile\n"),
    ],
)
def test_headers_makefile_is_made_relative(tmp_path, krel, text, fixed):
    mk = tmp_path / "usr/src" / f"linux-headers-{krel}" / "Makefile"
    mk.parent.mkdir(parents=True)
    mk.write_text(text)
    kernelpkgs.fix_headers(tmp_path, krel)
    assert mk.read_text() == fixed


def test_unknown_headers_layout_is_an_error(tmp_path):
    mk = tmp_path / "usr/src/linux-headers-9.9-amd64/Makefile"
    mk.parent.mkdir(parents=True)
    mk.write_text("include /opt/elsewhere/Makefile\nKBUILD_OUTPUT=/usr/src/x\n")
    with pytest.raises(KbridgeError, match="unexpected headers Makefile"):
        kernelpkgs.fix_headers(tmp_path, "9.9-amd64")


@pytest.mark.parametrize(
    ("layout", "vmlinuz"),
    [
        ("boot/vmlinuz-{k}", True),  # bullseye to trixie: linux-image-KREL
        ("usr/lib/modules/{k}/vmlinuz", True),  # sid: linux-binary-KREL
    ],
)
def test_vmlinuz_in_either_layout(tmp_path, layout, vmlinuz):
    k = "7.2.13+deb14-amd64"
    p = tmp_path / layout.format(k=k)
    p.parent.mkdir(parents=True)
    p.write_bytes(b"x")
    assert kernelpkgs.vmlinuz(tmp_path, k) == p


def test_missing_vmlinuz_and_modules_are_errors(tmp_path):
    with pytest.raises(KbridgeError, match="no vmlinuz"):
        kernelpkgs.vmlinuz(tmp_path, "6.12.1-amd64")
    with pytest.raises(KbridgeError, match=r"no modules\.builtin"):
        modtree.modroot(tmp_path, "6.12.1-amd64")


def test_a_kernel_without_kprobes_is_refused():
    config = kconfig.parse_config("CONFIG_MODULES=y\n# CONFIG_KPROBES is not set\nCONFIG_KPROBE_EVENTS=y\n")
    with pytest.raises(KbridgeError, match="without CONFIG_KPROBES"):
        kconfig.check_config(config, "Debian x 1.0")
    kconfig.check_config({"CONFIG_MODULES": "y", "CONFIG_KPROBES": "y", "CONFIG_KPROBE_EVENTS": "y"}, "ok")


def test_module_names_with_compression_suffixes():
    assert modtree._module_name(Path("virtio_pci.ko.xz")) == "virtio_pci"
    assert modtree._module_name(Path("virtio-console.ko")) == "virtio_console"
    assert modtree._module_name(Path("crc32c_generic.ko.zst")) == "crc32c_generic"


@pytest.mark.parametrize(
    ("suite", "lines"),
    [
        ("sid", 1),  # no sid-updates, no sid-security
        ("bullseye", 3),
    ],
)
def test_apt_sources_per_suite(tmp_path, suite, lines):
    apt = PrivateApt(tmp_path, suite, "amd64", Mirrors())
    apt._prepare()
    text = (tmp_path / "sources.list").read_text()
    assert len(text.splitlines()) == lines
    assert ("-security" in text) == (suite != "sid")
    assert "-security" not in _without_security(tmp_path, suite)


def _without_security(tmp_path: Path, suite: str) -> str:
    apt = PrivateApt(tmp_path / "nosec", suite, "amd64", Mirrors(), security=False)
    apt._prepare()
    return (tmp_path / "nosec/sources.list").read_text()


@pytest.mark.parametrize(
    ("text", "gcc"),
    [
        ("CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-16\n", "16"),
        ("override ARCH = x86\nCC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-10\n", "10"),
    ],
)
def test_kernel_gcc(tmp_path, text, gcc):
    f = tmp_path / "usr/src/linux-headers-x/.kernelvariables"
    f.parent.mkdir(parents=True)
    f.write_text(text)
    assert buildroot.kernel_gcc(tmp_path) == gcc


def test_build_root_packages():
    x86, arm = get_arch("x86_64"), get_arch("arm64")
    assert buildroot.packages(x86, "14", "linux-kbuild-6.12.118+deb13")[:2] == ["make", "gcc-14"]
    assert buildroot.packages(arm, "16", "linux-kbuild-7.2")[1] == "gcc-16-aarch64-linux-gnu"


def test_build_root_sources():
    m = Mirrors("http://m/debian", "http://m/debian-security")
    assert buildroot.sources("sid", m) == ["deb http://m/debian sid main"]
    assert buildroot.sources("trixie", m)[-1] == "deb http://m/debian-security trixie-security main"


def test_wrap_binds_headers_and_module_dir():
    argv = buildroot.wrap(Path("/r"), Path("/h"), Path("/m"), ["make", "-C", "/kb/headers"])
    assert argv[:2] == ["unshare", "--mount"]
    assert argv[-6:] == ["/r", "/h", "/m", "--", "make", "-C", "/kb/headers"][-6:]


def _img(suite: str, arch: str) -> image.Image:
    return image.Image(Path("/cache/images") / f"{suite}-{arch}", get_arch(arch), suite, "5.10.0-46-amd64", "1")


def test_bullseye_modules_use_the_host_gcc_12():
    # bullseye's headers ask for gcc-10; gcc-12 builds modules that load (measured).
    img = _img("bullseye", "x86_64")
    assert not uses_build_root(img)
    argv = kbuild_argv(img, Path("/m"))
    assert "CC=gcc-12" in argv and argv[0] == "make"
    arm = kbuild_argv(_img("bullseye", "arm64"), Path("/m"))
    assert "CC=aarch64-linux-gnu-gcc-12" in arm


def test_trixie_and_sid_use_a_build_root():
    assert uses_build_root(_img("trixie", "x86_64")) and uses_build_root(_img("sid", "arm64"))


def test_unreachable_sources_are_errors():
    from kbridge.images.apt import FetchError, update_error

    main = "W: Failed to fetch http://127.0.0.1:9/debian/dists/trixie/InRelease  Could not connect\n"
    sec = "W: Failed to fetch http://m/debian-security/dists/bullseye-security/InRelease  404\n"
    assert update_error("W: something else\n", "trixie", "amd64") is None
    err = update_error(main + sec, "trixie", "amd64")
    assert type(err) is KbridgeError and "trixie (amd64)" in err.message and "127.0.0.1:9" in err.message
    assert isinstance(update_error(sec, "bullseye", "arm64"), FetchError)  # build without -security


def test_optional_module_absent_from_a_kernel_is_skipped(tmp_path):
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    assert modtree.module_closure(tmp_path, ("virtio", "crc32c_generic"), optional=("crc32c_generic",)) == []
    with pytest.raises(KbridgeError, match="no module 'crc32c_generic'"):
        modtree.module_closure(tmp_path, ("crc32c_generic",))


class _Apt:
    """apt-cache answers as captured from Debian's archive (trixie and sid, amd64)."""

    suite = "sid"

    def __init__(self, depends: dict[str, list[str]]) -> None:
        self._depends = depends

    def depends(self, package: str) -> list[str]:
        return self._depends[package]

    def version(self, package: str) -> str:
        return "7.2.13-1"


def test_sid_kernel_packages_are_split_in_three():
    k = "7.2.13+deb14-amd64"
    apt = _Apt(
        {
            "linux-image-amd64": ["linux-base-amd64", f"linux-image-{k}"],
            f"linux-image-{k}": [f"linux-base-{k}", f"linux-binary-{k}", f"linux-modules-{k}"],
            f"linux-headers-{k}": [
                "gcc-16-for-host",
                "linux-base",
                f"linux-base-{k}",
                "linux-headers-7.2.13+deb14-common",
                "linux-kbuild-7.2.13+deb14",
            ],
        }
    )
    pkgs = kernelpkgs.kernel_packages(apt, get_arch("x86_64"))  # type: ignore[arg-type]
    assert pkgs.krel == k
    assert pkgs.binary == (f"linux-image-{k}", f"linux-base-{k}", f"linux-binary-{k}", f"linux-modules-{k}")
    assert pkgs.headers == (f"linux-headers-{k}", "linux-headers-7.2.13+deb14-common")
    assert pkgs.kbuild == ("linux-kbuild-7.2.13+deb14",)


def test_trixie_kernel_package_holds_the_kernel():
    k = "6.12.118+deb13-amd64"
    apt = _Apt(
        {
            "linux-image-amd64": [f"linux-image-{k}"],
            f"linux-image-{k}": ["kmod"],
            f"linux-headers-{k}": [
                "linux-base",
                "linux-headers-6.12.118+deb13-common",
                f"linux-image-{k}-unsigned",
                "linux-kbuild-6.12.118+deb13",
                "gcc-14",
            ],
        }
    )
    pkgs = kernelpkgs.kernel_packages(apt, get_arch("x86_64"))  # type: ignore[arg-type]
    assert pkgs.binary == (f"linux-image-{k}",)
    assert pkgs.headers == (f"linux-headers-{k}", "linux-headers-6.12.118+deb13-common")


def test_a_missing_security_index_is_built_without_security(tmp_path, monkeypatch):
    """apt-get update failing (exit 100) only on -security's index, as bullseye-security's armhf index
    did here (404), is a FetchError: the image is built from the point release and -updates."""
    import subprocess

    from kbridge.images import apt
    from kbridge.images.apt import FetchError

    stderr = (
        "E: Failed to fetch http://deb.debian.org/debian-security/dists/bullseye-security/main/binary-armhf/"
        "Packages  404  Not Found [IP: 203.0.113.80 80]\n"
        "E: Some index files failed to download. They have been ignored, or old ones used instead.\n"
    )
    monkeypatch.setattr(apt.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 100, "", stderr))
    mirrors = Mirrors("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")
    with pytest.raises(FetchError):
        PrivateApt(tmp_path, "bullseye", "armhf", mirrors).update()
    main = stderr.replace("debian-security/dists/bullseye-security", "debian/dists/bullseye")
    monkeypatch.setattr(apt.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 100, "", main))
    with pytest.raises(KbridgeError) as e:
        PrivateApt(tmp_path, "bullseye", "armhf", mirrors).update(force=True)
    assert type(e.value) is KbridgeError  # the main archive unreachable: no fallback
