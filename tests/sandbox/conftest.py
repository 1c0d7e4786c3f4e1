"""Fixtures of the sandbox tests (kbridge.sandbox), defined in helpers.py beside the helpers they use."""

from tests.sandbox.helpers import box, detected, headers, secret, x86  # noqa: F401 - pytest fixtures
