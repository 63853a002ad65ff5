"""Every field a row brings is used as its format means it or refused in one line naming it; columns no
format reads are counted and reported; each source may have its own format, fields and roles."""

from __future__ import annotations

import json
import re

import pytest

from sft_dist.cli import main
from sft_dist.data.badrows import BadRow
from sft_dist.data.formats import Chat, normalize

from conftest import TINY_CONFIG
from fixtures.data import DATES, TOOL_TEMPLATE, data_config, write_jsonl

TRAIN = str(DATES / "train.jsonl")
USER, ANSWER = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}


def test_text_content_parts_are_joined_into_the_turns_text():
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]
    chat = normalize({"messages": [{"role": "user", "content": parts}, ANSWER]}, data_config(TRAIN))
    assert chat.messages[0] == {"role": "user", "content": "Name a colour."}


def test_sharegpt_row_system_and_alpaca_history_become_turns():
    sharegpt = normalize({"system": "Be brief.", "messages": [USER, ANSWER]}, data_config(TRAIN))
    assert sharegpt == Chat([{"role": "system", "content": "Be brief."}, USER, ANSWER])
    alpaca = normalize({"instruction": "And 3+3?", "output": "6", "history": [["2+2?", "4"]]},
                       data_config(TRAIN, format="alpaca"))
    assert alpaca.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                               {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]


@pytest.mark.parametrize("row, reason, says", [
    ({"messages": [USER], "chosen": [ANSWER], "rejected": [ANSWER]}, "preference_data", "preference data: not SFT"),
    ({"prompt": "2+2=", "completion": "5", "label": False}, "preference_data", "'label': preference data: not SFT"),
    ({"messages": [{"role": "user", "content": "<image>What is this?"}, ANSWER], "images": ["cat.png"]},
     "media_data", "'images': images, audio and video train under a vision-language or speech model task"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, ANSWER]},
     "media_content", "messages[0].content[0] is an image_url part"),
    ({"messages": [USER, {"role": "assistant", "content": "x", "weight": 0.5}]}, "wrong_type", "messages[1].weight"),
    ({"system": "A", "messages": [{"role": "system", "content": "B"}, USER, ANSWER]}, "two_system_prompts", "keep one"),
])
def test_fields_that_would_train_as_something_else_are_refused_naming_the_field(row, reason, says):
    fmt = "prompt_completion" if "prompt" in row else "messages"
    with pytest.raises(BadRow) as bad:
        normalize(row, data_config(TRAIN, format=fmt))
    assert bad.value.reason == reason and says in str(bad.value)


def test_a_preference_row_stops_the_run_naming_file_line_and_field(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"messages": [USER, ANSWER]},
                                                  {"prompt": [USER], "chosen": [ANSWER], "rejected": [ANSWER]}])
    code = main(["data", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", f"data.train={path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}:2: preference_data: 'chosen'/'rejected': preference data: not SFT")


def test_data_command_mixes_an_alpaca_file_and_a_sharegpt_tool_file(tmp_path, capsys):
    """LLaMA-Factory's `dataset: a,b`: one alpaca file (an unknown `id` column, a DPO row skipped) and one
    ShareGPT file with tool calls, each with its own format and fields, 30% held out for eval."""
    alpaca = [{"id": i, "instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(20)]
    alpaca.insert(3, {"instruction": "x", "output": "y", "chosen": "y", "rejected": "n"})
    sharegpt = [{"tools": json.dumps([{"name": "add", "parameters": {"type": "object"}}]), "conversations": [
        {"from": "human", "value": f"Add {i} and {i}"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": i, "b": i}})},
        {"from": "observation", "value": str(2 * i)}, {"from": "gpt", "value": f"It is {2 * i}."}]}
        for i in range(20)]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=2))
    write_jsonl(tmp_path / "tools.jsonl", sharegpt)
    (tmp_path / "tools.jinja").write_text(TOOL_TEMPLATE)
    sources = (f"[{{path: {tmp_path / 'alpaca.json'}, format: alpaca}}, {{path: {tmp_path / 'tools.jsonl'}, "
               "fields: {messages: conversations, role: from, content: value}}]")
    code = main(["data", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", f"data.train={sources}",
                 "--set", "data.format=messages", "--set", f"data.chat_template={tmp_path / 'tools.jinja'}",
                 "--set", "data.on_bad_row=skip", "--set", "data.eval=0.3", "--set", "data.max_seq_len=256"])
    out = capsys.readouterr().out
    assert code == 0, out
    counts = re.search(r"train: 41 rows read, (\d+) kept, (\d+) held out for eval, 1 dropped \(preference_data 1\)",
                       out)
    assert counts and int(counts.group(1)) + int(counts.group(2)) == 40, out
    assert "columns not read (ignored): id (20 rows)" in out
    assert "duplicate rows: 0; also in train: 0" in out and "also training rows" not in out  # held out: disjoint
    # Row 0 of the alpaca file, its answer alone learned (when it is not held out, it is the example).
    assert re.search(r"<\|im_start\|>user\nWhat is \d+ plus \d+\?<\|im_end\|>\n<\|im_start\|>assistant\n"
                     r"\[\[\d+<\|im_end\|>\]\]", out), out


def test_a_sources_own_fields_are_checked_against_its_own_format():
    from pydantic import ValidationError

    from sft_dist.config import DataConfig

    DataConfig.model_validate({"train": [{"path": "a.json", "format": "alpaca", "fields": {"instruction": "q"}}]})
    with pytest.raises(ValidationError) as err:
        DataConfig.model_validate({"train": ["b.jsonl", {"path": "a.json", "format": "alpaca",
                                                         "fields": {"messages": "conversations"}}]})
    assert "data.train.1.fields: messages is not a field of format alpaca" in str(err.value)


def test_columns_and_turn_keys_no_format_reads_are_named():
    from sft_dist.data.formats import extra_fields

    row = {"id": 7, "source": None, "system": "S", "tools": [], "messages": [
        {"role": "user", "content": "Hi", "lang": "en"}, {**ANSWER, "weight": 1, "name": "bot"}]}
    assert extra_fields(row, data_config(TRAIN)) == ["id", "messages[].lang"]  # null columns are not data
    assert extra_fields({"instruction": "x", "output": "y", "history": [], "rating": 5},
                        data_config(TRAIN, format="alpaca")) == ["rating"]


def test_a_parquet_file_of_tool_conversations_reads_as_its_json_lines(tmp_path):
    """Arrow gives every turn every key (null where a turn had none): nulls are absent keys, not values."""
    import datasets
    import pandas as pd

    from fixtures.data import run_prepare

    items = [{"messages": [{"role": "user", "content": f"Hi {i}"},
                           {"role": "assistant", "content": "Hello", "weight": 0},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": f"Bye {i}"}]}
             for i in range(4)]
    jsonl = run_prepare(tmp_path / "a", str(write_jsonl(tmp_path / "rows.jsonl", items)))
    pd.DataFrame(items).to_parquet(tmp_path / "rows.parquet")
    parquet = run_prepare(tmp_path / "b", str(tmp_path / "rows.parquet"))
    assert datasets.load_from_disk(parquet.train_dir)["labels"] == datasets.load_from_disk(jsonl.train_dir)["labels"]
    assert parquet.stats["train"]["extra_fields"] == {}
