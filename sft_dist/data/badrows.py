"""Rows that cannot be used: a short, countable reason, and the place the row came from, so that under
`data.on_bad_row: error` the one message names the file and the line (JSONL) or row index (others).
"""

from __future__ import annotations

from dataclasses import dataclass

from sft_dist.errors import UserError


class BadRow(Exception):
    """A row that cannot be used; `reason` is a countable label (`malformed_json`), `detail` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class Origin:
    file: str  # a file, a save_to_disk folder or a hub dataset name
    line: int | None = None  # 1-based line of a JSONL file
    row: int | None = None  # 0-based row index where there are no lines (Parquet, CSV, JSON arrays, ...)


def bad_row_error(reason: str, detail: str, origin: Origin) -> UserError:
    """The message that stops a run at its first bad row (data.on_bad_row: error)."""
    where = f"row {origin.row}: " if origin.line is None and origin.row is not None else ""
    what = f"{reason}: {detail}" if detail else reason
    return UserError(f"{where}{what} (set data.on_bad_row: skip to skip and count such rows)",
                     file=origin.file, line=origin.line)
