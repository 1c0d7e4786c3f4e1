"""The README's commands name tools the README's own install line provides."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", ROOT / "examples" / "chardev" / "README.md", ROOT / "examples" / "chardev" / "client.c"]


def _compilers() -> set[str]:
    found = set()
    for doc in DOCS:
        found |= set(re.findall(r"`?([\w.-]*gcc[\w.-]*) -static", doc.read_text()))
    return found


def test_docs_name_compilers() -> None:
    assert {"gcc-12", "aarch64-linux-gnu-gcc-12"} <= _compilers()


@pytest.mark.parametrize("name", sorted(_compilers()))
def test_every_compiler_the_docs_name_is_installed(name: str) -> None:
    # Debian's gcc-12-aarch64-linux-gnu provides aarch64-linux-gnu-gcc-12 only, not aarch64-linux-gnu-gcc.
    assert shutil.which(name), f"{name} is named in the docs but the README's install line does not provide it"
