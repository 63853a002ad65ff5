"""File shapes beyond JSONL/JSON/Parquet/CSV: gzipped JSON Lines and JSON, Arrow files, a pretty-printed
JSON object or `{"data": [...]}` wrapper, and .txt files by line, paragraph or whole document. Each
gives the same rows as the plain JSONL file of the same data (or the tokenizer's own encoding of the
text)."""

from __future__ import annotations

import gzip
import json

import datasets
import pyarrow as pa
import pytest

from fixtures.data import rows, run_prepare, tokenizer, write_jsonl


def saved_ids(prepared) -> list[list[int]]:
    return datasets.load_from_disk(prepared.train_dir)["input_ids"]


@pytest.mark.parametrize("shape", ["jsonl.gz", "json.gz", "wrapper.json", "arrow"])
def test_each_file_shape_gives_the_rows_of_the_plain_jsonl(tmp_path, shape):
    items = rows(6)
    expected = saved_ids(run_prepare(tmp_path / "plain", str(write_jsonl(tmp_path / "plain.jsonl", items))))
    path = tmp_path / f"data.{shape}"
    if shape == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in items).encode()))
    elif shape == "json.gz":
        path.write_bytes(gzip.compress(json.dumps(items).encode()))
    elif shape == "wrapper.json":
        path.write_text(json.dumps({"data": items}, indent=2))
    else:  # the Arrow IPC stream format that `datasets` itself writes
        table = pa.Table.from_pylist(items)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    assert saved_ids(run_prepare(tmp_path / "shape", str(path))) == expected


def test_a_single_pretty_printed_object_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(rows(1)[0], indent=2))
    prepared = run_prepare(tmp_path, str(path))
    assert prepared.stats["train"]["rows_kept"] == 1 and prepared.stats["train"]["dropped"] == {}


@pytest.mark.parametrize("sample_by, documents", [
    ("line", ["First line.", "Second line.", "Third line."]),
    ("paragraph", ["First line.\nSecond line.", "Third line.\n"]),  # (datasets keeps the file's last newline)
    ("document", ["First line.\nSecond line.\n\nThird line.\n"]),
])
def test_text_files_split_by_line_paragraph_or_document(tmp_path, sample_by, documents):
    path = tmp_path / "notes.txt"
    path.write_text("First line.\nSecond line.\n\nThird line.\n")
    source = [{"path": str(path), "sample_by": sample_by}]
    prepared = run_prepare(tmp_path, source, format="text")
    tok = tokenizer()
    expected = [tok(d)["input_ids"] + [tok.eos_token_id] for d in documents]
    assert sorted(saved_ids(prepared)) == sorted(expected)
