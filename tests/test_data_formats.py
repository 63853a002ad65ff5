"""Each data.format, with field and role mapping, normalized into chat turns or plain text segments."""

from __future__ import annotations

import pytest

from sft_dist.data.badrows import BadRow
from sft_dist.data.formats import Chat, Plain, normalize

from fixtures.data import DATES, data_config

TRAIN = str(DATES / "train.jsonl")


def test_sharegpt_conversations_through_field_and_role_mapping():
    cfg = data_config(TRAIN, fields={"messages": "conversations", "role": "from", "content": "value"},
                      roles={"human": "user", "gpt": "assistant"})
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    assert normalize(row, cfg) == Chat([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a"}])


def test_alpaca_puts_instruction_and_input_in_the_user_turn():
    cfg = data_config(TRAIN, format="alpaca")
    with_input = normalize({"instruction": "Translate", "input": "chat", "output": "cat", "system": "S"}, cfg)
    assert with_input == Chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Translate\n\nchat"},
                               {"role": "assistant", "content": "cat"}])
    assert normalize({"instruction": "Hi", "input": None, "output": "Yo"}, cfg).messages[0]["content"] == "Hi"


def test_prompt_completion_strings_are_plain_text_and_turn_lists_a_conversation():
    cfg = data_config(TRAIN, format="prompt_completion")
    assert normalize({"prompt": "1+1=", "completion": "2"}, cfg) == Plain([("1+1=", False), ("2", True)])
    all_cfg = data_config(TRAIN, format="prompt_completion", loss_on="all")
    assert normalize({"prompt": "1+1=", "completion": "2"}, all_cfg) == Plain([("1+1=", True), ("2", True)])
    turns = normalize({"prompt": [{"role": "user", "content": "q"}],
                       "completion": [{"role": "assistant", "content": "a"}]}, cfg)
    assert turns == Chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


def test_text_is_supervised_everywhere_and_fields_map_columns():
    cfg = data_config(TRAIN, format="text", fields={"text": "body"})
    assert normalize({"body": "Some document."}, cfg) == Plain([("Some document.", True)])


@pytest.mark.parametrize("fmt, row, reason", [
    ("messages", {"msgs": []}, "missing_field"),
    ("messages", {"messages": [{"role": "user"}]}, "missing_field"),
    ("messages", {"messages": [{"role": "robot", "content": "x"}]}, "unknown_role"),
    ("messages", {"messages": []}, "empty_conversation"),
    ("messages", {"messages": [{"role": "user", "content": "x"}]}, "no_assistant_turn"),
    ("messages", {"messages": [{"role": "assistant", "content": ["x"]}]}, "non_string_content"),
    ("messages", "just a string", "not_an_object"),
    ("alpaca", {"instruction": "x"}, "missing_field"),
    ("alpaca", {"instruction": "x", "output": 3}, "non_string_content"),
    ("prompt_completion", {"prompt": "x", "completion": ""}, "empty_completion"),
    ("text", {"text": "  "}, "empty_text"),
])
def test_unusable_rows_raise_a_countable_reason(fmt, row, reason):
    with pytest.raises(BadRow) as bad:
        normalize(row, data_config(TRAIN, format=fmt))
    assert bad.value.reason == reason
