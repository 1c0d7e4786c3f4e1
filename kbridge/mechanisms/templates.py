"""The one Jinja environment for every C template: the module templates in kmod/, and the templates a
mechanism keeps in its own folder (mechanisms/bpf/bpf.c.j2)."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2


def template_dir() -> Path:
    """kmod/ from the installed package, else from the source tree."""
    installed = Path(__file__).resolve().parent.parent / "kmod"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "kmod"


@functools.cache
def environment() -> jinja2.Environment:
    """StrictUndefined: a template that names a value the renderer did not pass fails loudly."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(template_dir()), str(Path(__file__).resolve().parent / "bpf")]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, **values: object) -> str:
    """Render the template NAME from kmod/ with VALUES."""
    return environment().get_template(name).render(**values)
