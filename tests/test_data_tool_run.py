"""A 2-worker Ray run on mixed sources (an alpaca file and a ShareGPT file with tool calls, each with its
own format and fields) trains, counts the column no format reads, and exports a model whose chat
template renders each tool-call conversation into exactly the tokens the engines trained on."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sft_dist.data.formats import normalize

from conftest import train_tiny
from fixtures.data import TOOL_TEMPLATE, data_config, write_jsonl
from fixtures.exported import saved_rows

SHAREGPT_FIELDS = {"messages": "conversations", "role": "from", "content": "value"}


def tool_rows(n: int) -> list[dict]:
    tools = json.dumps([{"name": "add", "description": "Add two numbers",
                         "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}])
    return [{"tools": tools, "conversations": [
        {"from": "human", "value": f"Add {i} and {i}"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": i, "b": i}})},
        {"from": "observation", "value": str(2 * i)}, {"from": "gpt", "value": f"It is {2 * i}."}]} for i in range(n)]


@pytest.fixture(scope="module")
def tool_run(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tool-run")
    alpaca = [{"id": i, "instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(16)]
    (folder / "alpaca.json").write_text(json.dumps(alpaca, indent=2))
    write_jsonl(folder / "tools.jsonl", tool_rows(16))
    (folder / "tools.jinja").write_text(TOOL_TEMPLATE)
    sources = (f"[{{path: {folder / 'alpaca.json'}, format: alpaca}}, {{path: {folder / 'tools.jsonl'}, "
               f"fields: {json.dumps(SHAREGPT_FIELDS)}}}]")
    run = train_tiny(folder, f"data.train={sources}", f"data.chat_template={folder / 'tools.jinja'}",
                     "data.max_seq_len=512", "train.max_steps=4", "eval.at_start=false", "eval.generate=null",
                     "checkpoint.every_steps=4", "checkpoint.export_at_end=true")
    return folder, run


def test_mixed_sources_train_on_two_workers_and_count_the_unread_column(tool_run):
    _folder, run = tool_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    train = summary["data"]["train"]
    assert train["rows_read"] == train["rows_kept"] == 32 and train["truncated"] == 0
    assert train["extra_fields"] == {"id": 16}


def test_the_exported_template_renders_tool_calls_as_the_training_data(tool_run):
    folder, run = tool_run
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    trained = {tuple(row["input_ids"]) for row in saved_rows(run, "train")}
    cfg = data_config(str(folder / "tools.jsonl"), fields=SHAREGPT_FIELDS)
    for row in tool_rows(16):
        chat = normalize(row, cfg)
        rendered = tokenizer.apply_chat_template(chat.messages, tools=chat.tools, return_dict=True)["input_ids"]
        assert tuple(rendered) in trained
