"""A lab directory on the student's disk: written by `lab start`/`lab solution`, read by `lab check`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kbridge import sandbox
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
    """The lab a directory holds and the student's files in it.

    A submission is hostile: the directory is refused if it holds a symbolic link, a FIFO, a
    device or too much (kbridge.sandbox.check_tree), and its files are read from a copy made
    without following a link or opening anything but a regular file.
    """
    if directory.is_symlink() or not directory.is_dir():
        raise KbridgeError(
            f"{str(directory)!r} is not a lab directory", "kbridge lab start LAB writes one; then kbridge lab check LAB"
        )
    sandbox.check_tree(directory)
    with tempfile.TemporaryDirectory(prefix="kblab-copy-") as tmp:
        copy = Path(tmp)
        sandbox.copy_submission(directory, copy / "marker", patterns=(MARKER,), max_file=4096)
        try:
            meta = json.loads((copy / "marker" / MARKER).read_text())
            lab = get(str(meta["lab"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise KbridgeError(
                f"{str(directory)!r} has no readable {MARKER} file: it was not made by `kbridge lab start`",
                "start the lab again elsewhere and copy your code in",
            ) from None
        sandbox.copy_submission(directory, copy / "files", patterns=lab.files, max_file=MAX_FILE)
        files = {}
        for fname in lab.files:
            path = copy / "files" / fname
            if not path.is_file():
                raise KbridgeError(
                    f"{str(directory / fname)!r} is missing", f"the {lab.name} lab needs {', '.join(lab.files)}"
                )
            try:
                files[fname] = path.read_text()
            except UnicodeDecodeError:
                raise KbridgeError(f"{str(directory / fname)!r} is not UTF-8 text") from None
    return lab, files
