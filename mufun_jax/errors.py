"""The one exception base for bad input that a run counts and skips rather than crashes on."""

from __future__ import annotations


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a preemption notice after saving; run the same command again


class InputError(ValueError):
    """An input that cannot be used; ``reason`` is a short counter key (``missing_file``, ``bad_time``,
    ``too_long``, ...) that skip counters and error records report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
