"""What the sandbox raises: a setup problem, a refused submission, no sandbox here."""

from __future__ import annotations

from kbridge.errors import KbridgeError


class SandboxError(KbridgeError):
    """The sandbox could not run a command (a setup problem, not the command's result)."""


class SubmissionRefused(SandboxError):
    """The submission holds a symlink, a special file or too much: refused before any build."""


class SandboxUnavailable(SandboxError):
    """bwrap is missing or cannot make its namespaces here: no submission is built."""
