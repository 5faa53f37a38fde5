"""The project's own exceptions and exit codes, in one low module that every layer may import:
bad input that a run counts and skips (:class:`InputError`) and a checkpoint that cannot be read
as what it claims to be (:class:`CheckpointError`)."""

from __future__ import annotations


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a preemption notice after saving; run the same command again


class InputError(ValueError):
    """An input that cannot be used; ``reason`` is a short counter key (``missing_file``, ``bad_time``,
    ``too_long``, ...) that skip counters and error records report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be read as what it claims to be."""
