"""Bug checkers' reports (KASAN, KFENCE, UBSAN, lockdep, sleeping in atomic context) as the debug kernel
printed them, on both arches: each is found, kept apart from a crash, ended where it ends, and blamed on
the module's function.

tests/unit/data/sanitizers/ARCH/WORD.txt: the kernel-log records (one a line, no timestamps) after
`echo WORD > /sys/kernel/debug/kbdebug/trigger` on 6.1.192-kbridge-debug (tests/vm/data/kbdebug), all in one
boot per arch in the order ab ba gfp sleep oob kfence uaf (arm64's sleep in a boot of its own);
console-sanitizers.txt is the serial console of that boot (timestamps, the `quiet loglevel=5` view).
"""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from kbridge import crashes, debuginfo, elf, oops, sanitizers

DATA = Path(__file__).parent / "data" / "sanitizers"
KREL = "6.1.192-kbridge-debug"

# trigger -> (checker, first line starts with, function blamed)
EXPECTED = {
    "uaf": ("KASAN", "BUG: KASAN: use-after-free in kbdebug_uaf.isra.0+", "kbdebug_uaf.isra.0"),
    "kfence": ("KFENCE", "BUG: KFENCE: use-after-free read in kbdebug_kfence.isra.0+", "kbdebug_kfence.isra.0"),
    "oob": ("UBSAN", "UBSAN: array-index-out-of-bounds in ", "kbdebug_oob"),
    "ba": ("lockdep", "WARNING: possible circular locking dependency detected", "kbdebug_lock_ba"),
    "gfp": ("atomic-sleep", "BUG: sleeping function called from invalid context at ", "kbdebug_gfp_atomic"),
    "sleep": ("atomic-sleep", "BUG: scheduling while atomic: sh/", "kbdebug_sleep_atomic"),
}
CASES = [(arch, word) for arch in ("x86_64", "arm64") for word in EXPECTED]


def _log(arch: str, word: str) -> str:
    return (DATA / arch / f"{word}.txt").read_text()


@pytest.mark.parametrize(("arch", "word"), CASES)
def test_each_report_is_found_kept_apart_from_a_crash_and_blamed_on_the_modules_function(arch: str, word: str) -> None:
    checker, first, function = EXPECTED[word]
    text = crashes.find(_log(arch, word))
    assert text is not None
    title = next(ln for ln in text.splitlines() if oops.is_oops(ln))
    assert title.startswith(first) and sanitizers.kind(title) == checker
    # The kernel carried on after each of them: none is a crash (an oops, a panic).
    assert not any(oops.is_crash(ln) for ln in text.splitlines())
    crash = crashes.Crash.of(text, arch, KREL)
    assert crash.checker == checker and crash.site is not None, crash
    assert (crash.site.function, crash.site.module) == (function, "kbdebug"), crash.site
    assert crash.title.startswith(first) and "in module kbdebug" in crash.title


@pytest.mark.parametrize(("arch", "word"), [(a, w) for a, w in CASES if w in ("uaf", "kfence", "oob")])
def test_kasan_kfence_and_ubsan_reports_end_at_their_closing_rule(arch: str, word: str) -> None:
    found = crashes.first_report(_log(arch, word))
    assert found is not None
    text, complete = found
    assert complete and set(text.splitlines()[-1].strip()) == {"="}
    assert "Memory state around the buggy address" in text or word != "uaf"  # the report's last part is in


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_a_report_cut_before_its_end_is_not_complete(arch: str) -> None:
    lines = _log(arch, "uaf").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("BUG: KASAN"))
    found = crashes.first_report("\n".join(lines[: start + 10]))
    assert found is not None and not found[1]


def test_lockdep_on_the_console_ends_with_its_stack_trace_and_names_both_locks() -> None:
    console = (DATA / "x86_64" / "console-sanitizers.txt").read_text()
    found = crashes.first_report(console)
    assert found is not None
    text, complete = found
    assert complete and text.splitlines()[-1].strip().endswith("</TASK>")
    assert "BUG: sleeping function" not in text  # the next report is not part of it
    head = "\n".join(sanitizers.head(text))
    assert "WARNING: possible circular locking dependency detected" in head
    assert "(lock_a)" in head and "(lock_b)" in head  # the lock it takes and the one it holds
    assert "kbdebug_lock_ba+0x21/0x40 [kbdebug]" in head
    assert "check_noncircular" not in head  # lockdep's own frames are left out of the head


def test_arm64_lockdep_ends_at_its_last_frame() -> None:
    text = _log("arm64", "ba") + "kbdebug: a later line\n"
    found = crashes.first_report(text)
    assert found is not None and found[1]
    assert found[0].splitlines()[-1].strip().startswith("el0t_64_sync+")


@pytest.mark.parametrize(("arch", "word"), [(a, w) for a in ("x86_64", "arm64") for w in ("uaf", "kfence", "gfp")])
def test_the_head_shows_what_was_caught_and_the_modules_frames_not_only_the_checkers(arch: str, word: str) -> None:
    text = crashes.find(_log(arch, word))
    assert text is not None
    head = sanitizers.head(text)
    _, first, function = EXPECTED[word]
    assert head[0].startswith(first)
    assert head[1].startswith(("Read of size 4 at addr", "Use-after-free read at", "in_atomic(): 1"))
    frames = [ln.strip() for ln in head[1:] if "+0x" in ln]
    # The module's frame leads: not dump_stack_lvl, print_report, kasan_report, __might_resched, kmalloc_trace.
    assert frames[0].startswith(function + "+"), head
    assert not any(f.startswith("? ") for f in frames)
    assert len(frames) <= 6


def test_lockdep_and_scheduling_while_atomic_restart_the_vm_kasan_does_not() -> None:
    assert sanitizers.restarts(_log("x86_64", "ba")) is not None  # lockdep is off after its first report
    assert sanitizers.restarts(_log("x86_64", "sleep")) is not None
    for word in ("uaf", "kfence", "oob", "gfp"):
        assert sanitizers.restarts(_log("x86_64", word)) is None, word


def test_the_legal_lock_order_is_no_report() -> None:
    assert crashes.find(_log("x86_64", "ab")) is None
    assert crashes.find(_log("arm64", "ab")) is None


def test_later_kernels_titles_and_timestamps() -> None:
    assert sanitizers.kind("[   12.000001] BUG: KASAN: slab-use-after-free in f+0x1/0x2 [m]") == "KASAN"  # 6.4+
    assert sanitizers.kind("BUG: kernel NULL pointer dereference, address: 0000000000000000") is None
    assert oops.is_crash("BUG: kernel NULL pointer dereference, address: 0000000000000000")
    assert oops.is_crash("general protection fault, probably for non-canonical address 0xdffffc0000000000: 0000")


def test_ubsans_own_file_and_line_is_where_when_no_debug_info_maps_the_frame() -> None:
    text = crashes.find(_log("x86_64", "oob"))
    assert text is not None
    crash = crashes.Crash.of(text, "x86_64", "not-a-kernel-kbridge-built-for")
    assert crash.where is not None and crash.where.endswith("kbdebug.c:114")
    gfp = crashes.Crash.of(crashes.find(_log("x86_64", "gfp")) or "", "x86_64", "none")
    assert gfp.where is None  # include/linux/sched/mm.h:274 is the kernel's might_sleep(), not the bug


def _kbdebug_ko(tmp_path: Path) -> Path:
    """kbdebug.ko with its DWARF as kbridge built it for the x86_64 debug kernel (tests/vm/data/kbdebug)."""
    ko = tmp_path / "kbdebug.debug.ko"
    ko.write_bytes(lzma.decompress((Path(__file__).parent / "data" / "kbdebug-x86_64.debug.ko.xz").read_bytes()))
    return ko


def test_a_return_address_maps_to_the_line_of_its_call_where_two_lines_meet(tmp_path: Path) -> None:
    """KASAN's report names its check's return address (kbdebug_uaf.isra.0+0xa2): the line is the call's,
    at +0xa1, where gcc's line table has two rows at one address (line 51, then 50): the later one holds."""
    data = _kbdebug_ko(tmp_path).read_bytes()
    assert elf.source_line(data, "kbdebug_uaf.isra.0", 0xA1) == ("kbdebug.c", 50)  # READ_ONCE(obj->value)


def test_the_kasan_report_is_mapped_to_the_users_source_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBRIDGE_CACHE", str(tmp_path))
    debuginfo.remember_module("kbdebug", KREL, "x86_64", _kbdebug_ko(tmp_path), "/home/me/kbdebug")
    text = crashes.find(_log("x86_64", "uaf"))
    assert text is not None
    crash = crashes.Crash.of(text, "x86_64", KREL)
    assert crash.where == "/home/me/kbdebug/kbdebug.c:50 (kbdebug_uaf.isra.0+0xa2)"
    lockdep = crashes.Crash.of(crashes.find(_log("x86_64", "ba")) or "", "x86_64", KREL)
    assert lockdep.where is not None and lockdep.where.startswith(
        "/home/me/kbdebug/kbdebug.c:91 "
    )  # mutex_lock(&lock_a)


def test_a_warn_on_debians_kernel_names_its_site_once_and_keeps_the_vm() -> None:
    """A WARN's own line holds the blamed frame: the title does not repeat it."""
    text = (DATA / "stock-warn-x86_64.txt").read_text()
    crash = crashes.Crash.of(text, "x86_64", "6.1.0-57-amd64")
    assert crash.checker is None and crash.site is not None and crash.site.module == "kbdebug"
    assert crash.title.count("kbdebug_warn+0xf/0x20") == 1, crash.title
    assert "kbdebug_warn+0xf/0x20 [kbdebug] (in module kbdebug)" in crash.title, crash.title
    assert sanitizers.restarts(text) is None and not any(oops.is_crash(ln) for ln in text.splitlines())


def test_a_guest_crash_is_printed_without_markup_escapes(capsys: pytest.CaptureFixture[str]) -> None:
    """The report's `[kbdebug]` is printed as the kernel wrote it, not as `\\[kbdebug]`."""
    import typer

    from kbridge.cli import output
    from kbridge.targets.base import GuestCrash

    text = (DATA / "stock-warn-x86_64.txt").read_text()
    crash = crashes.Crash.of(text, "x86_64", "6.1.0-57-amd64")

    @output.command
    def fails() -> None:
        raise GuestCrash(f"the x86_64 guest kernel reported {crash.title}", text, crash, fatal=False)

    with pytest.raises(typer.Exit) as e:
        fails()
    assert e.value.exit_code == 3
    err = capsys.readouterr().err
    assert "RIP: 0010:kbdebug_warn+0xf/0x20 [kbdebug]" in err, err
    assert "\\[" not in err
