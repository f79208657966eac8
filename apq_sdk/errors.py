"""Error types shared across apq-sdk.

Every user-facing error says what was expected, what was found and how to fix it; the CLI turns
`ApqError` into a message and exit code 1, `UsageError` into exit code 2.
"""

from __future__ import annotations


class ApqError(Exception):
    """A failure the user can act on (bad input file, impossible budget, missing tool)."""


class ModelLoadError(ApqError):
    """The model could not be found, read or recognised."""


class CalibrationError(ApqError):
    """Calibration text is missing or too short."""


class UsageError(ApqError):
    """Options that contradict each other or are out of range (CLI exit code 2)."""
