"""Normalizing a raw row of each `data.format` into one of two shapes: a chat (a list of
`{role, content}` turns, rendered later through a chat template) or plain text segments, each marked
supervised or not. Raises `BadRow` with a countable reason when a row cannot be used.

Field names come from `data.fields` (canonical name -> the dataset's column), role names from
`data.roles` (the dataset's role -> system/user/assistant): ShareGPT's `conversations` with `from` and
`value` is `fields: {messages: conversations, role: from, content: value}` and
`roles: {human: user, gpt: assistant}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft_dist.config import ROLES, DataConfig
from sft_dist.data.badrows import BadRow


@dataclass(frozen=True)
class Chat:
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Plain:
    segments: list[tuple[str, bool]]  # (text, supervised), concatenated as is; no chat template


Example = Chat | Plain


def normalize(row: Any, data: DataConfig) -> Example:
    """The row as a chat or as plain text, by `data.format` (one of causal_lm's formats)."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    return NORMALIZERS[data.format](row, data, lambda name: data.fields.get(name, name))


def _messages(row: dict, data: DataConfig, fields) -> Chat:
    return Chat(_turns(_required(row, fields("messages"), list), data, "messages"))


def _text(row: dict, data: DataConfig, fields) -> Plain:
    text = _required(row, fields("text"), str)
    if not text.strip():
        raise BadRow("empty_text", f"'{fields('text')}' is empty")
    return Plain([(text, True)])


def _required(row: dict, field: str, kind: type) -> Any:
    if row.get(field) is None:
        raise BadRow("missing_field", f"no '{field}' field")
    value = row[field]
    if not isinstance(value, kind):
        reason = "non_string_content" if kind is str else "wrong_type"
        raise BadRow(reason, f"'{field}' is {type(value).__name__}, expected {kind.__name__}")
    return value


def _turns(messages: list, data: DataConfig, field: str, need_assistant: bool = True) -> list[dict[str, str]]:
    if not messages:
        raise BadRow("empty_conversation", f"'{field}' is an empty list")
    role_key, content_key = data.fields.get("role", "role"), data.fields.get("content", "content")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get(role_key) is None or content_key not in turn:
            raise BadRow("missing_field", f"{field}[{i}] needs '{role_key}' and '{content_key}'")
        role = data.roles.get(turn[role_key], turn[role_key])
        if role not in ROLES:
            raise BadRow("unknown_role", f"{field}[{i}].{role_key} is {turn[role_key]!r}; expected one of "
                         f"{ROLES} (map other names with data.roles)")
        if not isinstance(turn[content_key], str):
            raise BadRow("non_string_content",
                         f"{field}[{i}].{content_key} is {type(turn[content_key]).__name__}, expected a string")
        turns.append({"role": role, "content": turn[content_key]})
    if need_assistant and not any(t["role"] == "assistant" for t in turns):
        raise BadRow("no_assistant_turn", "the conversation has no assistant turn to learn from")
    return turns


def _alpaca(row: dict, data: DataConfig, fields) -> Chat:
    instruction = _required(row, fields("instruction"), str)
    output = _required(row, fields("output"), str)
    extra = _optional_text(row, fields("input"))
    system = _optional_text(row, fields("system"))
    user = f"{instruction}\n\n{extra}" if extra else instruction
    turns = [{"role": "system", "content": system}] if system else []
    return Chat(turns + [{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _optional_text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRow("non_string_content", f"'{field}' is {type(value).__name__}, expected a string")
    return (value or "").strip()


def _prompt_completion(row: dict, data: DataConfig, fields) -> Example:
    """Strings are plain text (prompt + completion); lists of turns are a conversation (as in TRL)."""
    prompt, completion = row.get(fields("prompt")), row.get(fields("completion"))
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = _turns(prompt, data, fields("prompt"), need_assistant=False)
        messages += _turns(completion, data, fields("completion"))
        return Chat(messages)
    prompt = _required(row, fields("prompt"), str)
    completion = _required(row, fields("completion"), str)
    if not completion:
        raise BadRow("empty_completion", f"'{fields('completion')}' is empty")
    return Plain([(prompt, data.loss_on == "all"), (completion, True)])


# Each text format's reader (the formats of causal_lm; the classifiers' formats have their own encoders).
NORMALIZERS = {"messages": _messages, "alpaca": _alpaca, "prompt_completion": _prompt_completion, "text": _text}
