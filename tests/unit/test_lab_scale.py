"""Grading a class without a VM: shards, the number of VMs, the gradebook (CSV, and the HTML page
read back from a real headless browser), and the GitHub Actions workflow checked by actionlint.

The grades are captured `kbridge lab check --json` output (6.1, x86_64 and arm64), with the
directories renamed to students.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbridge.cli import app
from kbridge.errors import KbridgeError
from kbridge.labs import ci, gradebook
from kbridge.labs.parallel import default_jobs, parse_shard, shard

DATA = Path(__file__).parent / "data"
GRADES = [DATA / "lab-grades-x86_64.jsonl", DATA / "lab-grades-arm64.jsonl"]
README = Path(__file__).parents[2] / "README.md"
runner = CliRunner()


def test_shards_split_a_batch_whatever_its_order() -> None:
    dirs = [Path(f"submissions/s{i:02d}/kprobe-module") for i in range(30)]
    shares = [shard(dirs, k, 4) for k in range(1, 5)]
    assert sorted(d for s in shares for d in s) == sorted(dirs)  # every directory once
    assert [len(s) for s in shares] == [8, 8, 7, 7]
    assert shard(list(reversed(dirs)), 2, 4) == shares[1]  # a shell's glob order does not matter
    assert shard(dirs, 1, 1) == sorted(dirs)


@pytest.mark.parametrize("bad", ["0/4", "5/4", "2", "2/0", "a/b", "1/2/3", "-1/4"])
def test_a_bad_shard_is_refused(bad: str) -> None:
    with pytest.raises(KbridgeError, match=re.escape(repr(bad))):
        parse_shard(bad)


def test_default_jobs_fit_the_host_and_the_batch() -> None:
    assert default_jobs(1) == 1
    assert 1 <= default_jobs(300) <= (os.cpu_count() or 1)


def test_gradebook_merges_shards_one_row_per_student() -> None:
    book = gradebook.read(GRADES)
    assert book.students == ["ana", "bob", "carla", "dan"]
    rows = list(csv.DictReader(io.StringIO(gradebook.to_csv(book))))
    by = {r["student"]: r for r in rows}
    assert by["ana"]["kprobe-module x86_64 score"] == "8" and by["ana"]["kprobe-module arm64 score"] == "8"
    assert by["carla"]["kprobe-module x86_64 pre-count"] == "0"
    assert by["carla"]["kprobe-module x86_64 registered"] == "1"
    assert by["bob"]["kprobe-module x86_64 post-count"] == "0"  # skipped after the crash: not passed
    assert by["dan"]["kprobe-module x86_64 score"] == ""  # dan handed in kprobe-events only
    assert by["dan"]["kprobe-events x86_64 clean"] == "1" and by["dan"]["kprobe-events arm64 clean"] == "0"
    assert by["ana"]["score"] == "16" and by["ana"]["out of"] == "16"
    rates = {(lab, arch, check): (p, n) for lab, arch, check, p, n in gradebook.pass_rates(book)}
    assert rates["kprobe-module", "x86_64", "pre-count"] == (1, 3)
    assert rates["kprobe-module", "arm64", "post-ip"] == (1, 2)


def test_grades_read_twice_count_once(tmp_path: Path) -> None:
    book = gradebook.read([GRADES[0], GRADES[0]])
    assert book.replaced == 4 and book.students == ["ana", "bob", "carla", "dan"]


def test_a_file_that_is_not_grades_is_refused_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "grades.jsonl"
    bad.write_text(GRADES[0].read_text().splitlines()[0] + "\nnot json\n")
    with pytest.raises(KbridgeError, match=r"grades.jsonl:2 is not a report"):
        gradebook.read([bad])
    res = runner.invoke(app, ["lab", "report", str(bad), "--csv", str(tmp_path / "g.csv")])
    assert res.exit_code == 2 and "grades.jsonl:2 is not a report" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "g.csv").exists()


class _Page(HTMLParser):
    """What the browser's DOM holds: rate rows, student sections and their failures, element texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: dict[str, list[str]] = {}
        self.students: dict[str, dict] = {}
        self.by_id: dict[str, str] = {}
        self._row: str | None = None
        self._student: str | None = None
        self._failure: str | None = None
        self._id: str | None = None
        self._hint = False
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-check"):
            self._row = a["data-check"]
            self.rates[self._row] = []
        elif tag == "section" and a.get("data-student"):
            self._student = a["data-student"]
            self.students[self._student] = {"hidden": "hidden" in a, "failures": {}, "hints": []}
        elif tag == "li" and "failure" in (a.get("class") or ""):
            self._failure = a.get("data-check")
        elif tag == "div" and a.get("class") == "hint":
            self._hint = True
        if a.get("id"):
            self._id = a["id"]
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        elif tag == "section":
            self._student = None
        elif tag == "div":
            self._hint = False
        if tag in ("span", "p", "table") and self._id:
            self.by_id[self._id] = "".join(self._text)
            self._id = None

    def handle_data(self, data: str) -> None:
        self._text.append(data)
        if self._row is not None and data.strip():
            self.rates[self._row].append(data.strip())
        if self._student is not None and self._failure is not None:
            s = self.students[self._student]
            if self._hint:
                s["hints"].append(data)
            else:
                s["failures"][self._failure] = s["failures"].get(self._failure, "") + data


def _browser() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome-headless-shell"):
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium here: apt-get install chromium-headless-shell (the README's install line)")


def _dump_dom(browser: str, page: Path) -> str:
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"{browser} cannot run here: {e}")
    if res.returncode != 0 or "<html" not in res.stdout:
        pytest.skip(f"{browser} cannot run here: {res.stderr.strip()[-300:]}")
    return res.stdout


def test_gradebook_page_in_a_real_browser(tmp_path: Path) -> None:
    browser = _browser()
    # A student's printed text reaches the page: it must stay text, whatever it holds.
    hostile = tmp_path / "hostile.jsonl"
    r = json.loads(GRADES[0].read_text().splitlines()[2])  # carla's fake
    r["directory"] = "submissions/eve/kprobe-module"
    r["checks"][3]["detail"] = '<script>document.title="owned"</script><img src=x onerror="alert(1)">'
    hostile.write_text(json.dumps(r) + "\n")
    out_csv, out_html = tmp_path / "gradebook.csv", tmp_path / "gradebook.html"
    res = runner.invoke(
        app, ["lab", "report", *map(str, GRADES), str(hostile), "--csv", str(out_csv), "--html", str(out_html)]
    )
    assert res.exit_code == 0, res.output
    assert "5 students" in res.output
    text = out_html.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # self-contained: nothing fetched
    page = _Page()
    page.feed(_dump_dom(browser, out_html))
    assert page.by_id["shown"] == "5 shown"  # the page's script ran
    assert page.rates["kprobe-module/x86_64/pre-count"][3:5] == ["1/4", "25%"]
    assert page.rates["kprobe-module/arm64/post-ip"][3:5] == ["1/2", "50%"]
    carla = page.students["carla"]
    assert set(carla["failures"]) == {"pre-count", "post-count", "prints", "post-ip"}
    assert "before the workload made any call" in carla["failures"]["pre-count"]
    assert any("atomic_inc(&pre_count)" in h for h in carla["hints"])
    assert "your pre_handler" not in json.dumps(page.students["ana"])
    assert page.students["bob"]["failures"].keys() == {"pre-count"}
    eve = page.students["eve"]["failures"]["pre-count"]
    assert "<script>" in eve and "onerror" in eve  # shown as text, not run: the title is still the page's
    assert "<title>kbridge lab grades</title>" in _dump_dom(browser, out_html)
    # A screenshot renders too (for a look: `--screenshot`), as a browser shows it to a teacher.
    shot = tmp_path / "page.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            out_html.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _actionlint() -> str:
    path = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(path).is_file():
        pytest.skip("actionlint is not installed: pip install -e '.[test]'")
    return path


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--lab", "kprobe-events", "--shards", "1", "--arch", "arm64"],
        [
            "--install",
            "git+https://example.org/kbridge.git@v1",
            "--submissions",
            "work/*/kretprobe",
            "--lab",
            "kretprobe",
        ],
    ],
    ids=["default", "one-shard-arm64", "pip-url"],
)
def test_github_workflow_passes_actionlint(tmp_path: Path, args: list[str]) -> None:
    lint = _actionlint()
    res = runner.invoke(app, ["lab", "ci", "--github", *args])
    assert res.exit_code == 0, res.output
    wf = tmp_path / ".github" / "workflows" / "grade.yml"
    wf.parent.mkdir(parents=True)
    wf.write_text(res.stdout)
    lint_res = subprocess.run([lint, str(wf)], capture_output=True, text=True, timeout=120)
    assert lint_res.returncode == 0, lint_res.stdout + lint_res.stderr
    # The linter does read it: the same workflow with a broken expression is refused.
    wf.write_text(res.stdout.replace("${{ matrix.arch }}", "${{ matrix.arc }}", 1))
    assert subprocess.run([lint, str(wf)], capture_output=True, timeout=120).returncode != 0


def test_workflow_values_are_checked_before_they_reach_yaml_and_shell() -> None:
    for kwargs in ({"submissions": "a b"}, {"submissions": "x;rm"}, {"install": "--index-url=x"}, {"shards": 0}):
        with pytest.raises(KbridgeError):
            ci.github_workflow("kprobe-module", **kwargs)  # type: ignore[arg-type]
    res = runner.invoke(app, ["lab", "ci"])
    assert res.exit_code == 2 and "--github" in res.output


def test_readme_ci_snippet_is_the_command_output() -> None:
    text = README.read_text()
    block = re.search(r"<!-- lab-ci -->\n```yaml\n(.*?)```", text, re.S)
    assert block is not None, "README: the CI snippet follows <!-- lab-ci -->"
    assert block[1] == ci.github_workflow("kprobe-module")


def test_workflow_grades_on_the_labs_own_arches_with_their_cross_compilers() -> None:
    """The default matrix is the lab's arches (32-bit arm only for the breakpoint lab), each non-x86_64
    arch's cross gcc and binutils installed; an arch the lab's material is not written for is refused."""
    assert "arch: [x86_64, arm64]\n" in ci.github_workflow("kprobe-module")
    assert "gcc-12-arm-linux-gnueabihf" not in ci.github_workflow("kprobe-module")
    bp = ci.github_workflow("breakpoint")
    assert "arch: [x86_64, arm64, arm]\n" in bp
    assert "gcc-12-arm-linux-gnueabihf binutils-arm-linux-gnueabihf" in bp and "gcc-12-aarch64-linux-gnu" in bp
    only_arm = ci.github_workflow("breakpoint", arches=("arm",))
    assert "arch: [arm]\n" in only_arm and "aarch64" not in only_arm
    with pytest.raises(KbridgeError, match="'kprobe-module' does not run on 'arm'"):
        ci.github_workflow("kprobe-module", arches=("arm",))
    res = runner.invoke(app, ["lab", "ci", "--github", "--arch", "arm"])
    assert res.exit_code != 0 and "does not run on 'arm'" in res.output and "Traceback" not in res.output
