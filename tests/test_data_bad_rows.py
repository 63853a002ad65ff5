"""Bad input: with data.on_bad_row: error one message names the file, the line (or row) and the reason;
with skip the rows are skipped and counted by reason. Never a zero-row "successful" preparation."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_dist import config as config_lib
from sft_dist.errors import UserError

from conftest import TINY_CONFIG
from fixtures.data import chat, rows, run_prepare, write_jsonl

BAD_LINES = {
    "malformed_json": '{"messages": [{"role": "user", "content": "unterminated',
    "missing_field": json.dumps({"conversation": chat("a", "b")["messages"]}),
    "unknown_role": json.dumps({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
    "empty_conversation": json.dumps({"messages": []}),
    "no_assistant_turn": json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    "non_string_content": json.dumps(chat("What is 2+2?", 4)),
    "not_an_object": json.dumps(["a", "list"]),
    "invalid_utf8": b'{"messages": "\xff\xfe"}',
}


def file_with_bad_line_3(tmp_path, bad) -> str:
    path = tmp_path / "data.jsonl"
    good = [json.dumps(r).encode() for r in rows(4)]
    path.write_bytes(b"\n".join([*good[:2], bad if isinstance(bad, bytes) else bad.encode(), *good[2:]]) + b"\n")
    return str(path)


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_error_names_file_line_and_reason(tmp_path, reason):
    path = file_with_bad_line_3(tmp_path, BAD_LINES[reason])
    with pytest.raises(UserError) as err:
        run_prepare(tmp_path, path)
    assert (err.value.file, err.value.line) == (path, 3)
    assert str(err.value).startswith(f"{path}:3: {reason}") and "on_bad_row: skip" in str(err.value)


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_skip_counts_the_row_by_reason(tmp_path, reason):
    stats = run_prepare(tmp_path, file_with_bad_line_3(tmp_path, BAD_LINES[reason]), on_bad_row="skip").stats
    assert stats["train"]["dropped"] == {reason: 1}
    assert (stats["train"]["rows_read"], stats["train"]["rows_kept"], stats["train"]["rows_skipped"]) == (5, 4, 1)


def test_parquet_bad_rows_are_named_by_row_index(tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"instruction": ["a", None, "c"], "output": ["1", "2", "3"]}).to_parquet(path)
    with pytest.raises(UserError) as err:
        run_prepare(tmp_path, str(path), format="alpaca")
    assert str(err.value).startswith(f"{path}: row 1: missing_field")


def test_a_missing_file_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(UserError) as err:
        config_lib.load(TINY_CONFIG, [f"data.train={tmp_path / 'nope.jsonl'}"])
    assert err.value.key == "data.train" and "file not found" in str(err.value)


def test_an_empty_file_stops_the_run_or_is_skipped_and_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_jsonl(tmp_path / "good.jsonl", rows(3))
    with pytest.raises(UserError) as err:
        run_prepare(tmp_path, [str(good), str(empty)])
    assert err.value.file == str(empty) and "empty_file" in str(err.value)
    stats = run_prepare(tmp_path, [str(good), str(empty)], on_bad_row="skip").stats["train"]
    assert stats["empty_files"] == [str(empty)] and stats["rows_kept"] == 3
    with pytest.raises(UserError) as err:
        run_prepare(tmp_path, str(empty), on_bad_row="skip")
    assert "no usable train rows" in str(err.value)


def test_a_dataset_of_only_bad_rows_never_prepares(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [BAD_LINES["empty_conversation"], BAD_LINES["unknown_role"]])
    with pytest.raises(UserError) as err:
        run_prepare(tmp_path, str(path), on_bad_row="skip")
    assert err.value.key == "data.train"
    assert "no usable train rows (dropped: empty_conversation 1, unknown_role 1)" in str(err.value)
