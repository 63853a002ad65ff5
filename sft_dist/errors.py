"""The user-facing error: what the user got wrong and where (file, line, key or rank); and the exit
codes every command ends with (`Exit`, the only place they are decided).

The CLI turns a `UserError` into one line on stderr and exit code 2; a run that started and failed
is exit code 1.
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    """What `sft-dist` exits with: every command returns one of these, through the CLI."""

    OK = 0
    FAILED = 1  # a run that started and failed (or a record it could not write); an interrupted search
    BAD_INPUT = 2  # bad config, data or arguments, found before anything distributed started
    STOPPED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended: saved, to be resumed


class RunFailure(RuntimeError):
    """A failure of a started run that its message explains whole (a full disk while saving): reported
    in one line, without the traceback that `--no-ray` prints for any other failure."""


class UserError(Exception):
    """Bad config, bad data or bad arguments, found before training starts."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
        rank: int | None = None,
    ):
        self.message, self.file, self.line, self.key, self.rank = message, file, line, key, rank
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        if self.rank is not None:
            where += f"rank {self.rank}: "
        if self.key:
            where += f"{self.key}: "
        return where + self.message
