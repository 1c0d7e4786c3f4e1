"""The one exception type kbridge raises for problems a user can act on."""

from __future__ import annotations


class KbridgeError(Exception):
    """An error with a message that quotes the bad input and a hint saying what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"
