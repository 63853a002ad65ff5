"""Files of a run written whole or not at all: a temporary file beside the target, then a rename.

A full disk or a crash mid-write leaves the previous version (or nothing), never a 0-byte or half
`summary.json`, `config.yaml`, manifest or plot. Also what an out-of-space error looks like, so the
driver can say "no space left" in one line instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write; it replaces `path` once the block ends without an error."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def out_of_space(err: BaseException) -> bool:
    """ENOSPC or a quota, as the OS says it or as a library (pyarrow, Ray) words it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "Disk quota exceeded" in str(err)


def append_line(path: Path, line: str) -> None:
    """Append one line (newline added) whole, or leave the file as it was: a write cut short by a full
    disk is truncated away, so a JSONL file never holds half a record."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":  # a line torn by a crash: leave it on its own
            data = b"\n" + data
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a last line torn by a crash mid-write is left out."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
