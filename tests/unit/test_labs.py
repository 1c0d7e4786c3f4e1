"""Labs without a VM: skeleton/solution derivation, lab directories, grading, answer parsing,
oops-to-line mapping on a real object file, and the `kbridge lab` commands that refuse bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbridge.arch import ARM64, X86_64
from kbridge.cli import app
from kbridge.errors import KbridgeError
from kbridge.kbuild import Built
from kbridge.labs import LABS, ablation, get, labdir, markers
from kbridge.labs.checkers import breakpoint as bp
from kbridge.labs.checkers import kprobe_module, three_ways
from kbridge.labs.grading import CheckSpec, Grader, Report, Status, StudentCrash
from kbridge.labs.guest import workload_binary
from kbridge.labs.kmodule import StudentModule, crash_detail, oops_site

runner = CliRunner()

SAMPLE = """\
int f(void)
{
\tint x = 0;

\t/* TODO 1: set x to 42
\t * (two comment lines) */
\tx = 42;
\t//@ x = 0; /* placeholder */
\t/* END TODO 1 */
# TODO 2: a shell-style block
# continued
echo reference
#@ :
# END TODO 2
\treturn x;
}
"""


def test_skeleton_keeps_todo_text_and_placeholders_drops_reference() -> None:
    skel = markers.skeleton(SAMPLE)
    assert "/* TODO 1: set x to 42\n\t * (two comment lines) */" in skel
    assert "x = 42;" not in skel and "echo reference" not in skel
    assert "\tx = 0; /* placeholder */" in skel and "\n:\n" in skel
    assert "END TODO" not in skel and "//@" not in skel and "#@" not in skel


def test_solution_keeps_reference_drops_placeholders() -> None:
    sol = markers.solution(SAMPLE)
    assert "\tx = 42;" in sol and "echo reference" in sol and "TODO 1: set x to 42" in sol
    assert "placeholder" not in sol and "END TODO" not in sol and "\n:\n" not in sol


def test_todos_are_listed_in_order() -> None:
    assert [(t.number, t.text) for t in markers.todos(SAMPLE)] == [(1, "set x to 42"), (2, "a shell-style block")]


@pytest.mark.parametrize(
    "bad, why",
    [
        ("/* TODO 1: a */\nx\n", "never closed"),
        ("/* TODO 1: a */\n/* END TODO 2 */\n", "does not close"),
        ("/* TODO 1: a */\n/* TODO 2: b */\n", "opens inside"),
        ("/* TODO 1: a */\n/* END TODO 1 */\n/* TODO 1: b */\n/* END TODO 1 */\n", "twice"),
    ],
)
def test_malformed_markers_are_refused(bad: str, why: str) -> None:
    with pytest.raises(KbridgeError, match=why):
        markers.skeleton(bad, "lab.c")


@pytest.mark.parametrize("name", list(LABS))
def test_every_lab_source_derives_a_skeleton_and_a_solution(name: str) -> None:
    lab = get(name)
    assert lab.readme().startswith("# Lab: ")
    numbered = []
    for fname in lab.files:
        src = lab.source(fname)
        todos = markers.todos(src, fname)
        assert todos, f"{name}/{fname} has no TODO"
        numbered += [t.number for t in todos]
        skel, sol = markers.skeleton(src, fname), markers.solution(src, fname)
        assert skel != sol and "END TODO" not in skel + sol
        assert "//@" not in skel + sol and "#@" not in skel + sol
    if len(lab.files) == 1:
        assert sorted(numbered) == list(range(1, len(numbered) + 1)), "TODOs are numbered 1..N"


def test_unknown_lab_names_the_labs() -> None:
    with pytest.raises(KbridgeError) as e:
        get("kprobes")
    assert "'kprobes'" in e.value.message and "kprobe-module" in (e.value.hint or "")


def test_lab_dir_round_trip_and_refusals(tmp_path: Path) -> None:
    lab = get("kprobe-module")
    written = labdir.write(lab, tmp_path / "km", "skeleton")
    assert {p.name for p in written} == {"kprobe_lab.c", "README.md"}
    got, files = labdir.load(tmp_path / "km")
    assert got is lab and files["kprobe_lab.c"] == markers.skeleton(lab.source("kprobe_lab.c"))
    (tmp_path / "km" / "kprobe_lab.c").write_text("my work")
    with pytest.raises(KbridgeError, match="not empty"):
        labdir.write(lab, tmp_path / "km", "skeleton")
    assert (tmp_path / "km" / "kprobe_lab.c").read_text() == "my work"  # bad input changes nothing
    labdir.write(lab, tmp_path / "km", "solution", force=True)
    assert labdir.load(tmp_path / "km")[1]["kprobe_lab.c"] == markers.solution(lab.source("kprobe_lab.c"))
    (tmp_path / "km" / "kprobe_lab.c").unlink()
    with pytest.raises(KbridgeError, match="missing"):
        labdir.load(tmp_path / "km")
    (tmp_path / "plain").mkdir()
    with pytest.raises(KbridgeError, match="not made by"):
        labdir.load(tmp_path / "plain")
    with pytest.raises(KbridgeError, match="not a lab directory"):
        labdir.load(tmp_path / "nowhere")


SPECS = [
    CheckSpec("a", "", "hint a"),
    CheckSpec("b", "", "hint b"),
    CheckSpec("c", "", "hint c"),
    CheckSpec("d", "", "hint d"),
]


def test_grader_skips_what_depends_on_a_failure_and_keeps_the_order() -> None:
    g = Grader(SPECS, Report("x", "dir", "x86_64", "6.1"))
    g.result("b", False, "b broke")
    g.result("a", True, "fine")
    assert not g.ready("c", "b")
    report = g.finish("not run: reason")
    assert [c.name for c in report.checks] == ["a", "b", "c", "d"]
    assert [c.status for c in report.checks] == [Status.PASS, Status.FAIL, Status.SKIP, Status.SKIP]
    assert "needs b" in report.checks[2].detail and report.checks[3].detail == "not run: reason"
    assert not report.ok and report.score == (1, 4)
    data = report.to_json()
    assert data["score"] == 1 and data["total"] == 4 and data["ok"] is False
    assert [c["score"] for c in data["checks"]] == [1, 0, 0, 0]
    assert data["checks"][0]["hint"] is None and data["checks"][1]["hint"] == "hint b"
    json.dumps(data)


def test_all_passed_is_ok_and_a_skipped_lab_is_not() -> None:
    g = Grader(SPECS[:1], Report("x", "dir", "x86_64"))
    g.result("a", True, "")
    assert g.finish().ok
    assert not Report("x", "dir", "arm64", skipped="no 5.10 image").ok


def test_breakpoint_answers_are_read_per_arch() -> None:
    text = markers.solution(get("breakpoint").source("answers.txt"))
    x86, arm = bp.parse_answers(text, "x86_64"), bp.parse_answers(text, "arm64")
    assert set(x86) == set(arm) == set(bp.QUESTIONS)
    assert (x86["entry_mode"], arm["entry_mode"]) == ("ftrace", "breakpoint")
    assert bp.parse_answers(markers.skeleton(get("breakpoint").source("answers.txt")), "x86_64") == {}
    assert bp.parse_answers("x86_64.entry_mode = FTrace  # my guess\n", "x86_64") == {"entry_mode": "ftrace"}


def test_mnemonic_from_inspect_disassembly() -> None:
    # Lines as kbridge.inspect.disassemble prints them (captured from 6.1 guests).
    assert bp.mnemonic("ffffffff81367680: e8 7b c9 ec 3e call 0xffffffffc0234000") == "call"
    assert bp.mnemonic("ffffffff81367685: cc int3") == "int3"
    assert bp.mnemonic("ffffffff81367680: 0f 1f 44 00 00 nopl 0x0(%rax,%rax,1)") == "nopl"
    assert bp.mnemonic("ffffca2e6c3ac154: d4200080 brk #0x4") == "brk"
    assert bp.mnemonic("ffffca2e6c3ac154: aa1e03e9 mov x9, x30") == "mov"


# kbcheck_detach's state file as a 6.1 arm64 guest showed it (the lab's reference solution loaded),
# and with the post-handler not attached (.post_handler left out).
DETACH_STATE = """\
addr ffffb670f97ac270
hits 35
owned 1
detached 1
undetached 0
others 0
kprobe0 pre=handler_pre post=handler_post
"""
DETACH_NO_POST = DETACH_STATE.replace("detached 1", "detached 0").replace("post=handler_post", "post=none")
PROBE = 0xFFFFB670F97AC270


def detached(text: str, pre: int, post: int) -> ablation.Detached:
    d = ablation.Detached.parse(text)
    d.before, d.after = {"pre": 28, "post": 28}, {"pre": 28 + pre, "post": 28 + post}
    return d


def test_detach_state_is_read_as_the_module_writes_it() -> None:
    d = ablation.Detached.parse(DETACH_STATE + "kprobe1 pre=other_pre post=none\n")
    assert (d.addr, d.hits, d.owned, d.detached, d.undetached, d.others) == (PROBE, 35, 1, 1, 0, 0)
    assert d.handlers == [("handler_pre", "handler_post"), ("other_pre", "none")]
    assert ablation.Detached.parse("hits x\n") == ablation.Detached(0, 0, 0, 0, 0, 0)


def test_post_count_passes_only_when_it_stands_still_without_the_post_handler() -> None:
    ok, detail = kprobe_module.detached_verdict(detached(DETACH_STATE, 35, 0), PROBE, 35)
    assert ok, detail
    assert "detached your post-handler handler_post (a no-op in its place) for 35 more write() calls" in detail
    assert "pre_count +35, post_count +0" in detail and "\n" not in detail
    # Counted in the pre-handler: it moves with the post-handler detached.
    ok, detail = kprobe_module.detached_verdict(detached(DETACH_STATE, 35, 35), PROBE, 35)
    assert not ok and "post_count +35: post_count moved while no post-handler of yours ran" in detail
    # No post-handler attached: nothing to detach, and no count can come from one.
    ok, detail = kprobe_module.detached_verdict(detached(DETACH_NO_POST, 35, 35), PROBE, 35)
    assert not ok and "(pre-handler handler_pre) has no post-handler attached" in detail
    ok, _ = kprobe_module.detached_verdict(detached(DETACH_NO_POST, 35, 0), PROBE, 35)
    assert not ok


@pytest.mark.parametrize(
    ("state", "calls", "words"),
    [
        (DETACH_STATE.replace("hits 35", "hits 34"), 35, "the calls did not all reach the probe"),
        (DETACH_STATE.replace("addr ffffb670f97ac270", "addr ffffb670f97ac274"), 35, "not at your probe's"),
        (DETACH_STATE.replace("owned 1", "owned 0").replace("others 0", "others 2"), 35, "(2 others): not checked"),
        (DETACH_STATE.replace("owned 1", "owned 17").replace("undetached 0", "undetached 1"), 35, "too many"),
    ],
)
def test_a_detach_step_that_proves_nothing_fails(state: str, calls: int, words: str) -> None:
    ok, detail = kprobe_module.detached_verdict(detached(state, calls, 0), PROBE, calls)
    assert not ok and words in detail, detail


def test_detach_refuses_names_it_would_pass_to_insmod() -> None:
    for owner, comm in (("kprobe lab", "kblab"), ("kprobe_lab", "kb lab"), ("x=1", "kblab"), ("kprobe_lab", "")):
        with pytest.raises(ablation.AblationError, match="not a module name and comm"):
            ablation.detached_run(None, PROBE, owner, comm, ["true"], dict)  # type: ignore[arg-type]


def test_three_ways_keys_keep_everything_after_the_first_equals() -> None:
    keys = three_ways.parse_keys(markers.solution(get("three-ways").source("event.txt")))
    assert keys == {"event": "p:three/ksys_write ksys_write", "filter": 'comm == "kblab"'}
    assert three_ways.parse_keys(markers.skeleton(get("three-ways").source("event.txt"))) == {}


# An oops from a lab module whose pre-handler wrote through a bad pointer (x86_64, Linux 6.1).
OOPS = """\
BUG: unable to handle page fault for address: ffffffffc02371b5
#PF: supervisor write access in kernel mode
Oops: 0003 [#1] PREEMPT SMP NOPTI
CPU: 0 PID: 457 Comm: kblab Tainted: G           OE      6.1.0-56-amd64 #1  Debian 6.1.192-2
RIP: 0010:handler_pre+0x{off:x}/0xeaa [kprobe_lab]
Call Trace:
 <TASK>
 kprobe_ftrace_handler+0x10b/0x1b0
 __x64_sys_write+0x5/0x20
"""

HANDLER = """\
struct regs;
int counter;

int handler_pre(void *p, struct regs *r)
{
\tcounter++;
\t*(volatile int *)p = 0;
\treturn 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc-12") is None, reason="needs the host gcc-12")
def test_oops_is_mapped_to_the_students_line(tmp_path: Path) -> None:
    src = tmp_path / "kprobe_lab.c"
    src.write_text(HANDLER)
    obj = tmp_path / "kprobe_lab.ko"  # a relocatable ELF with debug info, as a .ko is
    subprocess.run(["gcc-12", "-g", "-O1", "-c", str(src), "-o", str(obj)], check=True)
    # Find the store's offset in handler_pre, as an oops would report it.
    dis = subprocess.run(["objdump", "-d", "-l", str(obj)], capture_output=True, text=True, check=True).stdout
    store = next(ln for ln in dis.splitlines() if "movl" in ln and "$0x0,(" in ln)
    off = int(store.split(":")[0].strip(), 16)
    mod = StudentModule("kprobe_lab", Built("kprobe_lab", obj, obj, "6.1.0-56-amd64", "x86_64"), "km/kprobe_lab.c")
    site = oops_site(OOPS.format(off=off), mod)
    assert site == f"km/kprobe_lab.c:7 (handler_pre+{off:#x})"
    detail = crash_detail(StudentCrash("the guest kernel oopsed", OOPS.format(off=off)), mod)
    assert detail.startswith("the guest kernel oopsed, at km/kprobe_lab.c:7") and "Oops: 0003" in detail
    # Frames of other modules, or none, give no line.
    assert oops_site(OOPS.replace("[kprobe_lab]", "[other]").format(off=off), mod) is None


@pytest.mark.parametrize("arch", [X86_64, ARM64], ids=lambda a: a.name)
def test_workload_is_a_static_binary_without_a_bss_only_segment(arch) -> None:  # type: ignore[no-untyped-def]
    cc = f"{arch.cross_compile()}gcc-12"
    if shutil.which(cc) is None:
        pytest.skip(f"needs {cc}")
    path = workload_binary(arch)
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[18] == (0x3E if arch is X86_64 else 0xB7)
    readelf = shutil.which(f"{arch.gnu_triplet}-readelf") or shutil.which("readelf")
    assert readelf
    loads = [
        ln.split()
        for ln in subprocess.run([readelf, "-lW", str(path)], capture_output=True, text=True).stdout.splitlines()
        if ln.strip().startswith("LOAD")
    ]
    assert loads and all(int(f[4], 16) > 0 for f in loads), "5.10 arm64 cannot exec a bss-only PT_LOAD"
    assert "INTERP" not in subprocess.run([readelf, "-lW", str(path)], capture_output=True, text=True).stdout


def test_cli_list_start_solution(tmp_path: Path) -> None:
    res = runner.invoke(app, ["lab", "list", "--json"])
    assert res.exit_code == 0, res.output
    names = [json.loads(line)["name"] for line in res.stdout.splitlines()]
    assert names == list(LABS)
    res = runner.invoke(app, ["lab", "start", "kretprobe", "--dir", str(tmp_path / "kr")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "kr" / "kretprobe_lab.c").is_file() and (tmp_path / "kr" / "README.md").is_file()
    res = runner.invoke(app, ["lab", "start", "kretprobe", "--dir", str(tmp_path / "kr")])
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(app, ["lab", "solution", "kretprobe", "--dir", str(tmp_path / "krs")])
    assert res.exit_code == 0
    assert "rp.maxactive = maxactive" in (tmp_path / "krs" / "kretprobe_lab.c").read_text()


@pytest.mark.parametrize(
    "args, words",
    [
        (["lab", "start", "nope"], "unknown lab 'nope'"),
        (["lab", "solution", "nope"], "unknown lab 'nope'"),
        (["lab", "check", "/nonexistent/dir"], "is not a lab directory"),
        (["lab", "check", "--shard", "5/4", "d"], "invalid --shard '5/4'"),
        (["lab", "check", "--jobs", "0", "d"], "Invalid value for '--jobs'"),
        (["lab", "report", "/nonexistent/grades.jsonl"], "cannot read '/nonexistent/grades.jsonl'"),
        (["lab", "ci", "--github", "--lab", "nope"], "unknown lab 'nope'"),
        (["lab", "ci", "--github", "--submissions", "a b"], "invalid --submissions 'a b'"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args: list[str], words: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert words in res.output and "Traceback" not in res.output


def test_cli_check_refuses_a_bad_directory_before_any_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kbridge.targets

    def no_vm(**_: object) -> None:
        raise AssertionError("a VM was asked for")

    monkeypatch.setattr(kbridge.targets, "acquire", no_vm)
    labdir.write(get("kprobe-module"), tmp_path / "good", "skeleton")
    (tmp_path / "bad").mkdir()
    res = runner.invoke(app, ["lab", "check", str(tmp_path / "good"), str(tmp_path / "bad")])
    assert res.exit_code == 2 and "bad" in res.output and "not made by" in res.output


COLD = """\
extern void report(const char *) __attribute__((cold));
int counter;

int handler_pre(void *p, void *r)
{
\tcounter++;
\tif (counter == 3) {
\t\t*(volatile int *)p = 0;
\t\treport("three");
\t}
\treturn counter > 100;
}
"""


@pytest.mark.skipif(shutil.which("gcc-12") is None, reason="needs the host gcc-12")
def test_an_oops_in_the_part_gcc_split_off_is_mapped_to_its_line(tmp_path: Path) -> None:
    # gcc -O2 moves the unlikely branch to handler_pre.cold (in .text.unlikely): an oops there
    # (as the labs' deliberate oops at pre_count == 3 gives on x86_64) still names the line.
    src = tmp_path / "kprobe_lab.c"
    src.write_text(COLD)
    obj = tmp_path / "kprobe_lab.ko"
    subprocess.run(["gcc-12", "-g", "-O2", "-c", str(src), "-o", str(obj)], check=True)
    dis = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True, check=True).stdout
    cold = dis[dis.index("<handler_pre.cold>:") :]
    store = next(ln for ln in cold.splitlines() if "mov" in ln and ",(%rdi)" in ln)
    off = int(store.split(":")[0].strip(), 16)
    mod = StudentModule("kprobe_lab", Built("kprobe_lab", obj, obj, "6.1.0-57-amd64", "x86_64"), "km/kprobe_lab.c")
    text = OOPS.replace("handler_pre+0x{off:x}/0xeaa", "handler_pre.cold+0x{off:x}/0x1c").format(off=off)
    assert oops_site(text, mod) == f"km/kprobe_lab.c:8 (handler_pre.cold+{off:#x})"
