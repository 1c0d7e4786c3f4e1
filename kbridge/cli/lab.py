"""`kbridge lab list|start|check|solution|report|ci`: kernel-course labs graded in a real guest kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from kbridge.cli import app
from kbridge.cli.options import ArchOpt
from kbridge.cli.output import command, emit_json, err, out
from kbridge.errors import KbridgeError
from kbridge.labs import LABS, ci, get, gradebook, labdir
from kbridge.labs.grading import Report, Status
from kbridge.labs.parallel import check_parallel, default_jobs, parse_shard, shard
from kbridge.labs.runner import require_dirs

lab_app = typer.Typer(
    help="Kernel-course labs: start one, check it in a real kernel, see the solution.", no_args_is_help=True
)
app.add_typer(lab_app, name="lab")

DirOpt = Annotated[Optional[Path], typer.Option("--dir", help="Where to write it (default: ./LAB).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite a non-empty directory.")]


@lab_app.command("list")
@command
def list_cmd(json_out: Annotated[bool, typer.Option("--json", help="One JSON object per lab.")] = False) -> None:
    """The labs: what each teaches, its kernel and arches, a student's time and a check's time."""
    if json_out:
        for lab in LABS.values():
            emit_json(
                {
                    "name": lab.name,
                    "title": lab.title,
                    "teaches": lab.teaches,
                    "files": list(lab.files),
                    "kernel": lab.kernel or "6.1",
                    "arches": list(lab.arches),
                    "minutes": lab.minutes,
                    "check_seconds": lab.check_seconds,
                }
            )
        return
    t = Table(
        title="kbridge labs",
        caption="check: seconds per `kbridge lab check` with the VM up, per arch",
    )
    t.add_column("lab", no_wrap=True)
    t.add_column("what it teaches")
    t.add_column("kernel", no_wrap=True)
    t.add_column("arches", no_wrap=True)
    t.add_column("student", no_wrap=True)
    t.add_column("check", no_wrap=True)
    for lab in LABS.values():
        secs = " / ".join(f"{lab.check_seconds[a]}" for a in lab.arches if a in lab.check_seconds)
        t.add_row(
            lab.name,
            f"{lab.title}: {lab.teaches}",
            lab.kernel or "6.1",
            " ".join(lab.arches),
            f"~{lab.minutes} min",
            f"{secs} s" if secs else "?",
        )
    out.print(t)
    err.print("start one with: kbridge lab start LAB (--json lists them for programs)")


def _write(name: str, which: str, dest: Path | None, force: bool) -> Path:
    lab = get(name)
    target = dest or Path(name if which == "skeleton" else f"{name}-solution")
    written = labdir.write(lab, target, which, force)
    err.print(f"[green]✓[/] wrote {escape(str(target))}/: {', '.join(escape(p.name) for p in written)}")
    return target


@lab_app.command("start")
@command
def start(
    name: Annotated[str, typer.Argument(help="The lab (kbridge lab list).")],
    dest: DirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write the lab's skeleton (with numbered TODOs) and README to ./LAB."""
    target = _write(name, "skeleton", dest, force)
    where = escape(str(target))
    err.print(f"next: read {where}/README.md, fill in the TODOs, then: kbridge lab check {where}")


@lab_app.command("solution")
@command
def solution(
    name: Annotated[str, typer.Argument(help="The lab (kbridge lab list).")],
    dest: Annotated[Optional[Path], typer.Option("--dir", help="Where to write it (default: ./LAB-solution).")] = None,
    force: ForceOpt = False,
) -> None:
    """For teachers: write the reference solution next to the lab (./LAB-solution)."""
    _write(name, "solution", dest, force)


@lab_app.command("check")
@command
def check(
    dirs: Annotated[list[str], typer.Argument(help="Lab directories (from kbridge lab start).")],
    arch: ArchOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per directory: a score per check.")] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the VM running afterwards (kbridge vm down stops it).")
    ] = False,
    jobs: Annotated[
        Optional[int],
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Grade on this many VMs at once (default: one per core, as memory allows); output in order.",
        ),
    ] = None,
    shard_spec: Annotated[
        Optional[str],
        typer.Option("--shard", help="Grade share K of N of the directories (K/N), for parallel CI jobs."),
    ] = None,
) -> None:
    """Build, load, run and grade each lab directory in a real guest kernel (one VM per job).

    Exit status: 0 when every check of every directory passed, 1 otherwise.
    """
    directories = require_dirs(dirs)
    if shard_spec is not None:
        k, n = parse_shard(shard_spec)
        directories = shard(directories, k, n)
        err.print(f"shard {k}/{n}: {len(directories)} of {len(set(require_dirs(dirs)))} directories")
        if not directories:
            return
    all_ok = True
    n_jobs = jobs if jobs is not None else default_jobs(len(directories))
    for report in check_parallel(directories, arch, n_jobs, keep=keep):
        all_ok &= report.ok
        if json_out:
            emit_json(report.to_json())
        else:
            show(report)
    if not all_ok:
        raise typer.Exit(1)


_MARK = {Status.PASS: "[green]✓[/]", Status.FAIL: "[red]✗[/]", Status.SKIP: "[dim]-[/]"}


def show(report: Report) -> None:
    """One line per check, with what was seen and, for a failed check, the hint."""
    head = f"{report.lab} in {report.directory} on {report.arch} {report.kernel}".strip()
    if report.skipped:
        err.print(f"[yellow]skipped[/] {escape(head)}: {escape(report.skipped)}")
        return
    err.print(f"[bold]{escape(head)}[/]")
    for c in report.checks:
        lines = c.detail.splitlines() or [""]
        shown = lines if c.status is Status.FAIL else lines[:1]
        err.print(f"  {_MARK[c.status]} {c.name:<14} {escape(shown[0])}")
        for extra in shown[1:60]:
            err.print(f"      {escape(extra)}")
        if c.status is Status.FAIL:
            err.print(f"      [cyan]hint: {escape(c.hint)}[/]")
    got, total = report.score
    style = "green" if report.ok else "red"
    err.print(
        f"  [{style}]{got}/{total} checks passed[/] ({report.seconds:.0f} s)"
        + (" [red]the code crashed the kernel: the VM was restarted[/]" if report.crashed else "")
        + (
            " [yellow]the VM was restarted: the code left the kernel unsafe[/]"
            if report.vm_restarted and not report.crashed
            else ""
        )
    )


@lab_app.command("report")
@command
def report_cmd(
    files: Annotated[list[Path], typer.Argument(help="JSON lines of `kbridge lab check --json` (shards merged).")],
    csv_path: Annotated[
        Path, typer.Option("--csv", help="Where to write the CSV: one row per student, one column per check.")
    ] = Path("gradebook.csv"),
    html_path: Annotated[
        Path, typer.Option("--html", help="Where to write the HTML page: pass rates, each student's failures.")
    ] = Path("gradebook.html"),
    title: Annotated[str, typer.Option("--title", help="The page's title.")] = "kbridge lab grades",
) -> None:
    """Merge graded shards into a gradebook: a CSV for an LMS import and one self-contained HTML page."""
    book = gradebook.read(files)
    for path, text in ((csv_path, gradebook.to_csv(book)), (html_path, gradebook.to_html(book, title))):
        try:
            path.write_text(text)
        except OSError as e:
            raise KbridgeError(f"cannot write {str(path)!r}: {e.strerror}") from None
    s = gradebook.summary(book)
    err.print(
        f"[green]✓[/] {s['students']} students, {s['reports']} reports ({s['ok']} with every check passed): "
        f"wrote {escape(str(csv_path))} and {escape(str(html_path))}"
        + (f" ({s['replaced']} graded twice: the last report counts)" if s["replaced"] else "")
    )


@lab_app.command("ci")
@command
def ci_cmd(
    github: Annotated[bool, typer.Option("--github", help="A GitHub Actions workflow (the only kind so far).")] = False,
    lab: Annotated[str, typer.Option("--lab", help="The lab to grade (kbridge lab list).")] = "kprobe-module",
    submissions: Annotated[
        Optional[str], typer.Option("--submissions", help="Glob of the students' lab directories.")
    ] = None,
    shards: Annotated[int, typer.Option("--shards", help="Parallel jobs per arch, each grading a share.")] = 4,
    arch: Annotated[
        Optional[list[str]], typer.Option("--arch", help="An arch to grade on (repeat it; default: the lab's arches).")
    ] = None,
    install: Annotated[
        str, typer.Option("--install", help="What pip installs kbridge from (default: a checkout at ./kbridge).")
    ] = "./kbridge",
    runs_on: Annotated[str, typer.Option("--runs-on", help="The runner image.")] = "ubuntu-24.04",
) -> None:
    """Print a CI workflow that grades a class: arches x shards, the image cache kept, a gradebook artifact."""
    if not github:
        raise KbridgeError("say which CI: --github", "kbridge lab ci --github > .github/workflows/grade.yml")
    text = ci.github_workflow(lab, submissions, shards, tuple(arch or ()), install, runs_on)
    out.print(text, end="", markup=False, highlight=False, soft_wrap=True)
