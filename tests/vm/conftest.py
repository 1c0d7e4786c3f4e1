"""VM tests boot real guests through kbridge's own pytest plugin (fixtures kbridge_vm, kbridge_session)."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)
