"""Errors the user can act on.

Every class also inherits the matching builtin, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working. Messages are one line: what is wrong (file, row or
key), the bad value, and the fix, in scikit-learn's "must be X. Got Y instead." form.
The CLI prints these without a traceback; any other exception is a bug and keeps it.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the CLI reports as a one-line message."""

    exit_code = 1


class ConfigError(PipelineError, ValueError):
    """The configuration is invalid (unknown key, wrong type, out of range)."""

    exit_code = 2


class InputError(PipelineError, ValueError):
    """Input data is malformed (missing column, wrong dimension, bad value)."""


class MissingInputError(PipelineError, FileNotFoundError):
    """An input file or folder does not exist."""


class OutputError(PipelineError, OSError):
    """An output location cannot be written."""


class StageOrderError(PipelineError, RuntimeError):
    """A stage was asked to run before the stage it depends on completed."""


class InterruptedRunError(PipelineError, KeyboardInterrupt):
    """The user stopped the run (Ctrl-C); completed stages are kept."""

    exit_code = 130


class OutputBusyError(PipelineError, RuntimeError):
    """Another run holds the output folder."""


class SchedulerError(PipelineError, ConnectionError):
    """The dask scheduler cannot be reached or started."""


def must_be(what: str, expected: str, got: object, fix: str = "") -> str:
    """Format the one-line message template used across the package.

    >>> must_be("The 'n_clusters' parameter", "an int >= 1", 0)
    "The 'n_clusters' parameter must be an int >= 1. Got 0 instead."
    """
    message = f"{what} must be {expected}. Got {got!r} instead."
    return f"{message} {fix}".strip()


def clip(text: str, limit: int = 60) -> str:
    """Shorten a bad value for a one-line message.

    >>> clip("x" * 100, 10)
    'xxxxxxx...'
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."
