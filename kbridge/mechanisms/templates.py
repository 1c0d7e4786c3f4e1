"""The one Jinja environment for the C templates of kbridge's modules (kmod/): jinja2 is imported when a
module is rendered, never for one built before (kbridge.mechanisms.kmod remembers those)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2


def template_dir() -> Path:
    """kmod/ from the installed package, else from the source tree."""
    installed = Path(__file__).resolve().parent.parent / "kmod"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "kmod"


@functools.cache
def environment() -> jinja2.Environment:
    """StrictUndefined: a template that names a value the renderer did not pass fails loudly."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(name: str, **values: object) -> str:
    """Render the template NAME from kmod/ with VALUES."""
    return environment().get_template(name).render(**values)
