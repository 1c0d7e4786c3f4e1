"""python -m kbridge: the same as the kbridge command."""

from kbridge.cli import main

main()
