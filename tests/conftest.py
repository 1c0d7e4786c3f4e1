"""Options of kbridge's own test suite (the kbridge pytest plugin's are in kbridge/pytest_plugin.py)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--build-debug-kernel",
        action="store_true",
        default=False,
        help="build kbridge's debug kernel (--kernel debug: ~13 min per arch on 2 cores) when a test needs it and "
        "it is not in the cache; without this those tests are skipped, saying how to build it",
    )
