"""python -m kbridge: the same as the kbridge command."""

from kbridge.cli import app

app(prog_name="kbridge")
