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


def test_long_text_is_packed_as_windows_and_long_prompts_cut_from_the_left(tmp_path):
    tok = tokenizer()
    document = " ".join(f"word{i}" for i in range(200))
    ids = tok(document)["input_ids"] + [tok.eos_token_id]
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": document}])
    prepared = run_prepare(tmp_path / "text", str(path), format="text", packing=True, max_seq_len=64)
    saved = datasets.load_from_disk(prepared.train_dir)
    # Every token of the document trains, in windows of 64 (packed rows keep each window's length).
    windows = [row_ids[sum(lens[:k]):sum(lens[:k + 1])] for row_ids, lens in zip(saved["input_ids"], saved["seq_lens"])
               for k in range(len(lens))]
    assert sorted(windows) == sorted(ids[i:i + 64] for i in range(0, len(ids), 64))
    assert prepared.stats["train"]["chunked"] == 1 and prepared.stats["train"]["truncated"] == 0
    # A prompt that fills max_seq_len: cut on the right nothing is learned; cut on the left the answer is.
    long_prompt = [{"messages": [{"role": "user", "content": document}, {"role": "assistant", "content": "done"}]}]
    chat_path = write_jsonl(tmp_path / "chat.jsonl", long_prompt + rows(1))
    right = run_prepare(tmp_path / "right", str(chat_path), max_seq_len=64)
    assert right.stats["train"]["dropped"] == {"too_long": 1}
    left = run_prepare(tmp_path / "left", str(chat_path), max_seq_len=64, truncation="left")
    assert left.stats["train"]["rows_kept"] == 2 and left.stats["train"]["truncated"] == 1
    kept = datasets.load_from_disk(left.train_dir)
    long_row = next(i for i, n in enumerate(kept["length"]) if n == 64)
    learned = [t for t, label in zip(kept["input_ids"][long_row], kept["labels"][long_row]) if label != -100]
    assert tok.decode(learned) == "done<|im_end|>"
