"""The errors ``edge-train``'s engine raises for its CLI to word (exit 2 for input, 1 otherwise)."""

from __future__ import annotations

from typing import Any


class EdgeError(RuntimeError):
    """A failure the user must act on (cloud unreachable, incompatible artifacts, ...)."""


class EdgeInputError(EdgeError):
    """Bad input found before training starts (arguments, key files, output places that cannot be
    written, data that does not fit the artifacts): nothing was trained or written. ``edge-train``
    exits with code 2 on it."""


class SummaryError(EdgeError):
    """The run completed but --summary could not be written; ``summary`` holds what it would have held."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary
