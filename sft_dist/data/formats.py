"""Normalizing raw rows of each `data.format` into one shape: a list of `{role, content}` turns.
Raises `BadRow` with a countable reason when a row cannot be used.
"""

from __future__ import annotations

from typing import Any

from sft_dist.data.sources import BadRow

ROLES = ("system", "user", "assistant")


def to_messages(data: dict[str, Any]) -> list[dict[str, str]]:
    """The `messages` format: `{"messages": [{"role": ..., "content": ...}, ...]}`."""
    if "messages" not in data:
        raise BadRow("missing_field", "no 'messages' field")
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRow("empty_conversation", "'messages' must be a non-empty list")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise BadRow("missing_field", f"messages[{i}] needs 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise BadRow("unknown_role", f"messages[{i}].role is {turn['role']!r}; expected one of {ROLES}")
        if not isinstance(turn["content"], str):
            raise BadRow("non_string_content", f"messages[{i}].content is {type(turn['content']).__name__}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if not any(t["role"] == "assistant" for t in turns):
        raise BadRow("no_assistant_turn", "the conversation has no assistant turn to learn from")
    return turns
