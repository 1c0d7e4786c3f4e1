"""A class's grades from `kbridge lab check --json` output: shards merged, one row per student.

`kbridge lab report grades*.jsonl` reads every report line, keeps the last report of each
(directory, lab, arch), and writes a CSV for an LMS import (one row per student, one column per
check, 1 or 0) and one self-contained HTML page: per-check pass rates, and each student's failures
with what the kernel showed and the hint. Nothing in the page is fetched from elsewhere; every text
from a submission is escaped.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kbridge.errors import KbridgeError
from kbridge.labs.grading import Report, Status

DETAIL_CHARS = 3000  # of a failed check's detail shown in the page (an oops can be long)


@dataclass
class Gradebook:
    """Reports by student; the (lab, arch) pairs and each one's checks, in the order first seen."""

    reports: dict[str, dict[tuple[str, str], Report]] = field(default_factory=dict)
    columns: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    replaced: int = 0  # reports read more than once (a shard graded again): the last one counts

    @property
    def students(self) -> list[str]:
        return sorted(self.reports)


def read(paths: list[Path]) -> Gradebook:
    """Every report in PATHS (JSON lines of `kbridge lab check --json`); a KbridgeError naming the
    file and line of the first one that is not."""
    if not paths:
        raise KbridgeError("no grades file given", "kbridge lab report grades-*.jsonl")
    found: list[Report] = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise KbridgeError(f"cannot read {str(path)!r}: {e.strerror}") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                found.append(Report.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise KbridgeError(
                    f"{path}:{n} is not a report of `kbridge lab check --json`: {line[:80]!r}",
                    "pass the files `kbridge lab check --json` wrote",
                ) from None
    book = Gradebook()
    names = student_names([r.directory for r in found], [r.lab for r in found])
    for r in found:
        key = (r.lab, r.arch)
        mine = book.reports.setdefault(names[r.directory], {})
        book.replaced += key in mine
        mine[key] = r
        cols = book.columns.setdefault(key, [])
        cols.extend(c.name for c in r.checks if c.name not in cols)
    return book


def student_names(directories: list[str], labs: list[str]) -> dict[str, str]:
    """A short name per directory: its path without what every directory shares at the start, and
    without a last part naming its lab (submissions/ana/kprobe-module -> ana)."""
    parts = {d: Path(d).parts for d in directories}
    common = 0
    if len(set(directories)) > 1:
        first = next(iter(parts.values()))
        while all(len(p) > common + 1 and p[common] == first[common] for p in parts.values()):
            common += 1
    names = {}
    for d, lab in zip(directories, labs, strict=True):
        rest = list(parts[d][common:])
        if len(rest) > 1 and rest[-1] == lab:
            rest.pop()
        names[d] = "/".join(rest) or Path(d).name or d
    return names


def _column(lab: str, arch: str, check: str) -> str:
    return f"{lab} {arch} {check}"


def to_csv(book: Gradebook) -> str:
    """One row per student; per (lab, arch): its score, then 1/0 per check (empty: not graded)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    head = ["student"]
    for (lab, arch), checks in book.columns.items():
        head.append(_column(lab, arch, "score"))
        head += [_column(lab, arch, c) for c in checks]
    head += ["score", "out of"]
    w.writerow(head)
    for student in book.students:
        row: list[str | int] = [student]
        got = total = 0
        for key, checks in book.columns.items():
            r = book.reports[student].get(key)
            if r is None:
                row += [""] * (1 + len(checks))
                continue
            status = {c.name: c.status for c in r.checks}
            score = r.score
            got, total = got + score[0], total + len(checks)
            row.append(score[0])
            row += [("" if c not in status else int(status[c] is Status.PASS)) for c in checks]
        w.writerow([*row, got, total])
    return out.getvalue()


def pass_rates(book: Gradebook) -> list[tuple[str, str, str, int, int]]:
    """(lab, arch, check, passed, graded) for every check: graded counts the reports that ran it or
    skipped it (a skipped check is not passed), not the labs skipped whole."""
    rows = []
    for (lab, arch), checks in book.columns.items():
        for check in checks:
            passed = graded = 0
            for student in book.students:
                r = book.reports[student].get((lab, arch))
                if r is None or r.skipped is not None:
                    continue
                graded += 1
                passed += any(c.name == check and c.passed for c in r.checks)
            rows.append((lab, arch, check, passed, graded))
    return rows


_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: .2em .6em; border-bottom: 1px solid #ddd; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { background: #eee; width: 12em; height: .9em; } .bar div { background: #3a7; height: 100%; }
.student { border: 1px solid #ddd; border-radius: 6px; padding: .3em 1em; margin: .6em 0; }
.ok { color: #1a7f37; } .bad { color: #c62828; } .hint { color: #0b5394; }
pre { background: #f6f6f6; padding: .5em; overflow-x: auto; font-size: 13px; white-space: pre-wrap; }
input { font-size: 1em; padding: .2em; width: 20em; }
"""

_SCRIPT = """
const box = document.getElementById('filter');
const shown = document.getElementById('shown');
function apply() {
  const q = box.value.toLowerCase();
  let n = 0;
  for (const s of document.querySelectorAll('.student')) {
    const hit = s.dataset.student.toLowerCase().includes(q);
    s.hidden = !hit;
    n += hit;
  }
  shown.textContent = n + ' shown';
}
box.addEventListener('input', apply);
apply();
"""


def to_html(book: Gradebook, title: str = "kbridge lab grades") -> str:
    """The gradebook as one self-contained page (inline style and script, nothing fetched)."""
    e = html.escape
    labs = sorted({lab for lab, _ in book.columns})
    arches = sorted({arch for _, arch in book.columns})
    p: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p id="summary">{len(book.students)} students; {e(", ".join(labs))} on {e(", ".join(arches))}</p>',
        "<h2>Pass rate per check</h2>",
        '<table id="rates"><tr><th>lab</th><th>arch</th><th>check</th><th>passed</th><th>rate</th><th></th></tr>',
    ]
    for lab, arch, check, passed, graded in pass_rates(book):
        pct = round(100 * passed / graded) if graded else 0
        p.append(
            f'<tr data-check="{e(lab)}/{e(arch)}/{e(check)}"><td>{e(lab)}</td><td>{e(arch)}</td><td>{e(check)}</td>'
            f'<td class="num">{passed}/{graded}</td><td class="num">{pct}%</td>'
            f'<td><div class="bar"><div style="width:{pct}%"></div></div></td></tr>'
        )
    p += [
        "</table>",
        "<h2>Students</h2>",
        '<p><input id="filter" type="search" placeholder="filter by name" aria-label="filter students"> '
        '<span id="shown"></span></p>',
    ]
    for student in book.students:
        p.append(f'<section class="student" data-student="{e(student)}"><h3>{e(student)}</h3><ul>')
        for (lab, arch), r in sorted(book.reports[student].items()):
            got, total = r.score
            flags = [f for f, on in (("crashed the kernel", r.crashed), ("VM restarted", r.vm_restarted)) if on]
            state = f"skipped: {e(r.skipped)}" if r.skipped else f"{got}/{total}"
            cls = "ok" if r.ok else "bad"
            p.append(
                f'<li data-report="{e(lab)}/{e(arch)}"><span class="{cls}">{e(lab)} on {e(arch)}: {state}</span>'
                + (f" ({e(', '.join(flags))})" if flags else "")
            )
            failed = [c for c in r.checks if c.status is Status.FAIL]
            if failed:
                p.append("<ul>")
                for c in failed:
                    detail = c.detail if len(c.detail) <= DETAIL_CHARS else c.detail[:DETAIL_CHARS] + "\n..."
                    p.append(
                        f'<li class="failure" data-check="{e(c.name)}"><b>{e(c.name)}</b>'
                        f"<pre>{e(detail)}</pre>"
                        + (f'<div class="hint">hint: {e(c.hint)}</div>' if c.hint else "")
                        + "</li>"
                    )
                p.append("</ul>")
            p.append("</li>")
        p.append("</ul></section>")
    p += [f"<script>{_SCRIPT}</script>", "</body></html>", ""]
    return "\n".join(p)


def summary(book: Gradebook) -> dict[str, int]:
    """Counts for the command's one-line summary."""
    per: dict[str, int] = defaultdict(int)
    for student in book.students:
        for r in book.reports[student].values():
            per["reports"] += 1
            per["ok"] += r.ok
    return {"students": len(book.students), "reports": per["reports"], "ok": per["ok"], "replaced": book.replaced}
