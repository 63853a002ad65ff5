"""Tool-calling conversations (OpenAI `tool_calls` / `tool` turns, ShareGPT `function_call` / `observation`
turns, a row's `tools`) rendered through the template's own tool format: the supervised tokens are
exactly those transformers' `return_assistant_tokens_mask` marks from the template's {% generation %}
blocks, and tool results are never supervised."""

from __future__ import annotations

import json

import pytest

from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.data.encode import Encoder
from sft_dist.data.formats import normalize
from sft_dist.data.templates import chat_template

from fixtures.data import DATES, TOOL_TEMPLATE, WEATHER_TOOL, data_config, tokenizer

TRAIN = str(DATES / "train.jsonl")
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
OPENAI_ROW = {"tools": [WEATHER_TOOL], "messages": [
    {"role": "system", "content": "You check the weather."},
    {"role": "user", "content": "Is it warm in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 24}'},
    {"role": "assistant", "content": "Yes: 24 degrees."},
]}
# The same conversation as LLaMA-Factory's ShareGPT files write it: tools as a JSON string column.
SHAREGPT_ROW = {"system": "You check the weather.", "tools": json.dumps([WEATHER_TOOL["function"]]),
                "conversations": [
                    {"from": "human", "value": "Is it warm in Paris?"},
                    {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                    {"from": "observation", "value": '{"celsius": 24}'},
                    {"from": "gpt", "value": "Yes: 24 degrees."},
                ]}
SHAREGPT = {"fields": {"messages": "conversations", "role": "from", "content": "value"}}


def encode_row(row: dict, template: str | None = TOOL_TEMPLATE, **overrides) -> dict:
    tok = tokenizer()
    cfg = data_config(TRAIN, max_seq_len=512, **overrides)
    out = Encoder(cfg, tok, chat_template(tok, template))({"_json": [json.dumps(row)], "_error": [None],
                                                          "_line": [1]}, [0])
    return {name: column[0] for name, column in out.items()}


def reference(row: dict, **overrides) -> dict:
    """transformers' own rendering, tokens and assistant mask of the normalized conversation."""
    chat = normalize(row, data_config(TRAIN, **overrides))
    return tokenizer().apply_chat_template(chat.messages, tools=chat.tools, chat_template=TOOL_TEMPLATE,
                                           tokenize=True, return_dict=True, return_assistant_tokens_mask=True)


def supervised_text(row: dict) -> str:
    return tokenizer().decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])


@pytest.mark.parametrize("row, overrides", [(OPENAI_ROW, {}), (SHAREGPT_ROW, SHAREGPT)], ids=["openai", "sharegpt"])
def test_tool_call_masks_are_the_templates_own_assistant_masks(row, overrides):
    encoded, ref = encode_row(row, **overrides), reference(row, **overrides)
    assert encoded["reason"] is None, encoded["detail"]
    assert encoded["input_ids"] == ref["input_ids"]
    assert [label != IGNORE_INDEX for label in encoded["labels"]] == [bool(m) for m in ref["assistant_masks"]]
    text = tokenizer().decode(encoded["input_ids"])
    assert '"name": "get_weather"' in text.split("<tools>\n")[1].split("</tools>")[0]  # the schema, in the prompt
    learned = supervised_text(encoded)
    # The call (arguments parsed from OpenAI's JSON string) and the answer are learned; the result never.
    assert learned == '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
                      "<|im_end|>Yes: 24 degrees.<|im_end|>"
    assert "celsius" not in learned and "celsius" in text


def test_sharegpt_and_openai_shapes_train_the_same_tokens():
    # (LLaMA-Factory's tools are bare function schemas, OpenAI's wrapped: the prompts differ by that)
    assert supervised_text(encode_row(SHAREGPT_ROW, **SHAREGPT)) == supervised_text(encode_row(OPENAI_ROW))


@pytest.mark.parametrize("row, overrides, reason", [
    (OPENAI_ROW, {}, "template_drops_tools"),
    ({"messages": OPENAI_ROW["messages"]}, {}, "template_drops_tool_calls"),
    ({"messages": [{"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}]},
     {}, "template_drops_reasoning"),
])
def test_a_template_without_tool_or_reasoning_support_refuses_the_row(row, overrides, reason):
    # The tiny model's own template (SmolLM2's ChatML) renders neither tools nor reasoning.
    encoded = encode_row(row, None, **overrides)
    assert encoded["reason"] == reason and encoded["bad"]


def test_reasoning_is_rendered_by_a_template_that_has_it_and_learned():
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}]}
    assert supervised_text(encode_row(row)) == "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"


def test_weight_0_turns_and_last_assistant_are_context_not_learned():
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there", "weight": 0},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    assert supervised_text(encode_row({"messages": turns})) == "Goodbye<|im_end|>"
    unweighted = [{k: v for k, v in t.items() if k != "weight"} for t in turns]
    assert supervised_text(encode_row({"messages": unweighted})) == "Hello there<|im_end|>Goodbye<|im_end|>"
    assert supervised_text(encode_row({"messages": unweighted}, loss_on="last_assistant")) == "Goodbye<|im_end|>"
    assert encode_row({"messages": turns[:2]})["reason"] == "no_assistant_turn"


def test_held_out_generation_prompts_keep_the_rows_tools(tmp_path):
    from fixtures.data import run_prepare, write_jsonl

    items = [{**OPENAI_ROW, "messages": [*OPENAI_ROW["messages"][:-1], {"role": "assistant", "content": f"{i} C."}]}
             for i in range(8)]
    path = write_jsonl(tmp_path / "tools.jsonl", items)
    prepared = run_prepare(tmp_path, str(path), num_prompts=1, eval=0.5, chat_template=TOOL_TEMPLATE, max_seq_len=512)
    (prompt,) = prepared.prompts
    assert prompt["tools"] == [WEATHER_TOOL] and prompt["messages"][-1]["role"] == "tool"
    assert prompt["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
