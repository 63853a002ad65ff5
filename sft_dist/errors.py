"""The user-facing error: what the user got wrong and where (file, line, key or rank).

The CLI turns a `UserError` into one line on stderr and exit code 2; anything else that escapes a run
is a failure of a run that started (exit code 1).
"""

from __future__ import annotations


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
