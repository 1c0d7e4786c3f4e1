"""A lab directory on the student's disk: written by `lab start`/`lab solution`, read by `lab check`."""

from __future__ import annotations

import json
from pathlib import Path

from kbridge.errors import KbridgeError
from kbridge.labs import Lab, get, markers

MARKER = ".kbridge-lab"
MAX_FILE = 256 * 1024  # a lab file is a page of code; anything bigger is not one


def write(lab: Lab, dest: Path, which: str, force: bool = False) -> list[Path]:
    """Write LAB's skeleton (WHICH='skeleton') or reference solution ('solution') and README to DEST."""
    if dest.exists() and not dest.is_dir():
        raise KbridgeError(f"{dest} exists and is not a directory", "name another directory with --dir")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise KbridgeError(
            f"{dest} already exists and is not empty: not overwriting the work in it",
            "check it with `kbridge lab check`, or pass --force to start over",
        )
    derive = markers.skeleton if which == "skeleton" else markers.solution
    texts = {f: derive(lab.source(f), f) for f in lab.files}  # all derived before anything is written
    texts["README.md"] = lab.readme()
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in texts.items():
        (dest / fname).write_text(text)
        written.append(dest / fname)
    (dest / MARKER).write_text(json.dumps({"lab": lab.name, "kind": which}) + "\n")
    return written


def load(directory: Path) -> tuple[Lab, dict[str, str]]:
    """The lab a directory holds and the student's files in it."""
    if not directory.is_dir():
        raise KbridgeError(
            f"{str(directory)!r} is not a lab directory", "kbridge lab start LAB writes one; then kbridge lab check LAB"
        )
    try:
        meta = json.loads((directory / MARKER).read_text())
        lab = get(str(meta["lab"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise KbridgeError(
            f"{str(directory)!r} has no readable {MARKER} file: it was not made by `kbridge lab start`",
            "start the lab again elsewhere and copy your code in",
        ) from None
    files = {}
    for fname in lab.files:
        path = directory / fname
        if not path.is_file():
            raise KbridgeError(f"{str(path)!r} is missing", f"the {lab.name} lab needs {', '.join(lab.files)}")
        if path.stat().st_size > MAX_FILE:
            raise KbridgeError(f"{str(path)!r} is larger than {MAX_FILE // 1024} KiB: not a lab file")
        try:
            files[fname] = path.read_text()
        except UnicodeDecodeError:
            raise KbridgeError(f"{str(path)!r} is not UTF-8 text") from None
    return lab, files
