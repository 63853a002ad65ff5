"""Reading raw rows from local files, each row tagged with where it came from (file and line), so that
every later complaint about a row can name its origin.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sft_dist.errors import UserError


@dataclass(frozen=True)
class Row:
    data: dict[str, Any]
    file: str
    line: int


class BadRow(Exception):
    """A row that cannot be used; `reason` is a short, countable label, `detail` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class BadRowPolicy:
    """`error` stops at the first bad row with its file and line; `skip` counts rows by reason."""

    on_bad_row: str
    skipped: Counter = field(default_factory=Counter)

    def handle(self, bad: BadRow, file: str, line: int) -> None:
        if self.on_bad_row == "error":
            raise UserError(f"{bad} (set data.on_bad_row: skip to skip such rows)", file=file, line=line)
        self.skipped[bad.reason] += 1


def read_jsonl(files: list[str], policy: BadRowPolicy) -> Iterator[Row]:
    for file in files:
        path = Path(file)
        if path.stat().st_size == 0:
            raise UserError("data file is empty", file=file)
        with path.open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    data = json.loads(raw.decode("utf-8"))
                    if not isinstance(data, dict):
                        raise BadRow("not_an_object", f"expected a JSON object, got {type(data).__name__}")
                except UnicodeDecodeError as err:
                    policy.handle(BadRow("invalid_utf8", str(err)), file, line_no)
                    continue
                except json.JSONDecodeError as err:
                    policy.handle(BadRow("malformed_json", err.msg), file, line_no)
                    continue
                except BadRow as bad:
                    policy.handle(bad, file, line_no)
                    continue
                yield Row(data, file, line_no)
