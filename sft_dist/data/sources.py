"""Opening data sources as `datasets` tables: memory-mapped Arrow, or iterables with `data.streaming`.

Local JSONL/JSON/Parquet/CSV files, globs and folders of them, `save_to_disk` folders, and hub datasets.
A source opens as parts, one per file (or folder, or hub split), so that a bad row can be traced to its
file. JSON files are read line by line here rather than by Arrow's JSON reader: a malformed line,
invalid UTF-8 or a field whose type changes between rows then becomes a countable bad row with its line
number, instead of an exception from inside pyarrow that names neither.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from sft_dist.config import SourceConfig
from sft_dist.data.badrows import BadRow, Origin
from sft_dist.errors import UserError
from sft_dist.local_paths import DATA_SUFFIXES, is_local_source

# Raw JSON rows: the line's text (parsed later, in parallel) or why it could not even be read.
JSON_FEATURES = datasets.Features(
    {"_json": datasets.Value("string"), "_error": datasets.Value("string"), "_line": datasets.Value("int64")}
)
WRAPPER_KEYS = ("data", "rows", "examples", "instances", "train")  # {"data": [rows]}: SQuAD-style files
BUILDERS = {"txt": "text"}  # the `datasets` packaged loader of a file suffix, where the names differ
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")  # read line by line here (gzip decompressed)
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Part:
    name: str  # what error messages cite: the file, the folder or the hub name
    dataset: datasets.Dataset | datasets.IterableDataset


def open_source(
    source: SourceConfig, streaming: bool, work_dir: Path
) -> tuple[list[Part], list[tuple[BadRow, Origin]]]:
    """The source's parts, and the file-level problems (empty files) that the bad-row policy judges."""
    if not is_local_source(source.path):
        return [_open_hub(source, streaming)], []
    path = Path(source.path).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        return [_open_saved(path, source.split, streaming)], []
    parts, problems = [], []
    for file in data_files(source.path):
        part = None if _blank(file) else _open_file(file, streaming, work_dir, source.sample_by)
        if part is None or (isinstance(part.dataset, datasets.Dataset) and len(part.dataset) == 0):
            problems.append((BadRow("empty_file", "the file has no rows"), Origin(file)))
        else:
            parts.append(part)
    return parts, problems


def _blank(file: str) -> bool:
    """Nothing but whitespace (an empty file, or blank lines only): no rows. (Arrow's readers would fail
    on it with an error that names neither the file nor the problem.)"""
    if file.endswith(".arrow"):  # binary: never blank, and an empty table is caught after opening
        return False
    with _open_bytes(file) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            if block.strip():
                return False
    return True


def data_files(path: str) -> list[str]:
    """The data files a local path names: itself, a glob's matches, or a folder's files (sorted)."""
    expanded = os.path.expanduser(path)
    if any(c in path for c in "*?["):
        files = glob.glob(expanded, recursive=True)
    elif os.path.isdir(expanded):
        files = [str(p) for p in Path(expanded).rglob("*")]
    else:
        files = [expanded]
    files = sorted(f for f in files if f.endswith(DATA_SUFFIXES) and os.path.isfile(f))
    if not files:
        raise UserError(f"no {', '.join(DATA_SUFFIXES)} files here", file=path)
    return files


def is_saved_dataset(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def fingerprint(source: SourceConfig) -> list[Any]:
    """What identifies the source's content for the cache key: local files by path, size and mtime."""
    if not is_local_source(source.path):
        return [source.path, source.config, source.split]
    path = Path(source.path).expanduser()
    files = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() and is_saved_dataset(path) \
        else data_files(source.path)
    return [source.split] + [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def content_digest(source: SourceConfig) -> list[Any]:
    """The source's content: each local file by relative name, size and SHA-256 (not by where it is: a Ray
    job's working directory moves between submissions); a hub dataset by name, config and split."""
    if not is_local_source(source.path):
        return [source.path, source.config, source.split]
    root = Path(source.path).expanduser()
    saved = root.is_dir() and is_saved_dataset(root)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file()) if saved else data_files(source.path)
    return [[str(Path(f).relative_to(root)) if root.is_dir() else Path(f).name, os.path.getsize(f), _sha256(f)]
            for f in files]


def _sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_file(file: str, streaming: bool, work_dir: Path, sample_by: str = "line") -> Part:
    if file.endswith(JSON_SUFFIXES):
        if streaming:
            return Part(file, datasets.IterableDataset.from_generator(
                json_rows, features=JSON_FEATURES, gen_kwargs={"file": file}))
        stat = os.stat(file)
        # Our own fingerprint: the library's would hash the arguments (the path), not the file's content.
        stamp = hashlib.sha256(json.dumps([file, stat.st_size, stat.st_mtime_ns]).encode()).hexdigest()[:16]
        return Part(file, datasets.Dataset.from_generator(
            json_rows, features=JSON_FEATURES, gen_kwargs={"file": file}, cache_dir=str(work_dir / "raw"),
            fingerprint=stamp))
    kind = file.rsplit(".", 1)[-1]
    # CSV cells stay strings: type inference would turn an answer "42" into a number in one file only.
    extra = {"features": _csv_strings(file)} if kind == "csv" else {}
    if kind == "txt":
        extra = {"sample_by": sample_by}
    try:
        loaded = datasets.load_dataset(BUILDERS.get(kind, kind), data_files=[file], split="train", streaming=streaming,
                                       cache_dir=str(work_dir / "raw"), **extra)
    except Exception as err:  # corrupt or unparsable files: the library's exception types vary by format
        raise UserError(f"cannot read this {kind} file: {first_line(err)}", file=file) from None
    if kind == "txt" and sample_by != "document":  # blank lines separate documents; they are not rows
        loaded = loaded.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)
    return Part(file, loaded)


def _csv_strings(file: str) -> datasets.Features:
    with open(file, newline="", encoding="utf-8", errors="replace") as handle:
        header = next(csv.reader(handle), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _open_bytes(file: str):
    """The file's bytes, decompressed for .gz (gzip's reader streams: a large file is never in memory)."""
    return gzip.open(file, "rb") if file.endswith(".gz") else open(file, "rb")


def json_rows(file: str) -> Iterator[dict[str, Any]]:
    """A JSONL file's non-empty lines, a JSON array's elements, or a JSON document holding one object
    (one row) or a wrapper of rows (`{"data": [...]}`), as raw JSON text with line numbers."""
    with _open_bytes(file) as handle:
        first = next((line for line in handle if line.strip(b"\xef\xbb\xbf \t\r\n")), b"")
        head = first.lstrip(b"\xef\xbb\xbf \t\r\n")
        handle.seek(0)
        document = _pretty_printed(handle) if head.startswith(b"{") and not _parses(first) else None
        handle.seek(0)
        if document is not None:
            yield from ({"_json": json.dumps(row), "_error": None, "_line": None} for row in _wrapped_rows(document))
        elif head.startswith(b"["):
            yield from _json_array(handle)
        else:
            yield from _json_lines(handle)


def _parses(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _pretty_printed(handle) -> Any:
    """An object spread over lines (one row, or `{"data": [...]}`), or None: then the file is JSON Lines
    whose first line is broken, and each line is judged on its own."""
    try:
        return json.loads(handle.read().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _json_lines(handle) -> Iterator[dict[str, Any]]:
    for line_no, raw in enumerate(handle, start=1):
        if line_no == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not part of the first row
        if not raw.strip():
            continue
        try:
            yield {"_json": raw.decode("utf-8").rstrip("\r\n"), "_error": None, "_line": line_no}
        except UnicodeDecodeError as err:
            yield {"_json": None, "_error": f"invalid_utf8: byte {err.start} of the line is not UTF-8",
                   "_line": line_no}


def _json_array(handle) -> Iterator[dict[str, Any]]:
    """A JSON file holding one array of rows: parsed whole (such files are not meant to exceed memory)."""
    try:
        rows = json.loads(handle.read().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        yield {"_json": None, "_error": f"invalid_utf8: byte {err.start} of the file is not UTF-8", "_line": None}
        return
    except json.JSONDecodeError as err:
        yield {"_json": None, "_error": f"malformed_json: {err.msg} (column {err.colno})", "_line": err.lineno}
        return
    for row in _wrapped_rows(rows):
        yield {"_json": json.dumps(row), "_error": None, "_line": None}


def _wrapped_rows(document: Any) -> list[Any]:
    """A JSON document's rows: an array's elements; a wrapper's list of rows (`{"data": [...]}`); else the
    document is one row. (Wrappers are known by their key: `{"messages": [...]}` is one row.)"""
    if isinstance(document, list):
        return document
    if isinstance(document, dict) and len(document) == 1:
        key, inner = next(iter(document.items()))
        if key in WRAPPER_KEYS and isinstance(inner, list):
            return inner
    return [document]


def _open_saved(path: Path, split: str, streaming: bool) -> Part:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged folder: name it rather than the library's internals
        raise UserError(f"cannot read this save_to_disk folder: {first_line(err)}", file=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"no split {split!r} here (splits: {', '.join(loaded)}); set the source's split",
                            file=str(path))
        loaded = loaded[split]
    return Part(str(path), loaded.to_iterable_dataset() if streaming else loaded)


def _open_hub(source: SourceConfig, streaming: bool) -> Part:
    try:
        loaded = datasets.load_dataset(source.path, source.config, split=source.split, streaming=streaming)
    except Exception as err:  # offline, unknown name, gated, missing config or split: all need the same advice
        raise UserError(
            f"cannot load hub dataset (config {source.config}, split {source.split}): {first_line(err)}. "
            "Offline? Point the source at a local file or save_to_disk folder (HF_HUB_OFFLINE=1 skips the "
            "network retries)", file=source.path) from None
    return Part(source.path, loaded)


def first_line(err: BaseException) -> str:
    """The root cause's first line: `datasets` wraps reader errors in a generic "error while generating"."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
