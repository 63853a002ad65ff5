"""Normalizing a raw row of each `data.format` into one of two shapes: a chat (a list of
`{role, content}` turns, with tool calls and a row's tool schemas, rendered later through a chat
template) or plain text segments, each marked supervised or not. Raises `BadRow` with a countable
reason when a row cannot be used.

Field names come from `data.fields` (canonical name -> the dataset's column), role names from
`data.roles` (the dataset's role -> system/user/assistant/tool): ShareGPT's `conversations` with `from`
and `value` is `fields: {messages: conversations, role: from, content: value}`; its role names (human,
gpt, observation, function_call) are known without mapping.

Every field a row carries is used as its format means it, or refused with one line naming it: nothing
trains as if it were not there. Columns no format reads are left to `extra_fields`, which counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft_dist.config import FORMAT_FIELDS, ROLES, DataConfig
from sft_dist.data.badrows import BadRow
from sft_dist.data.tool_calls import function_call_turn, row_tools, tool_calls

# ShareGPT's (and LLaMA-Factory's) role names; data.roles maps any others.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool"}
FUNCTION_CALL = "function_call"  # ShareGPT: an assistant turn whose value is the JSON of its tool calls
# What a turn may carry besides its role and content, passed on to the chat template (OpenAI's and
# transformers' names); `weight` (OpenAI: 0 = not learned) is read here and not passed on.
TURN_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url")
MEDIA_COLUMNS = ("images", "audios", "videos")
NOT_SFT = "preference data: not SFT"


@dataclass(frozen=True)
class Chat:
    messages: list[dict[str, Any]]
    tools: list[dict] | None = None  # the row's tool schemas, for apply_chat_template(tools=...)
    unsupervised: tuple[int, ...] = ()  # assistant turns seen in context but not learned (weight 0)


@dataclass(frozen=True)
class Plain:
    segments: list[tuple[str, bool]]  # (text, supervised), concatenated as is; no chat template


Example = Chat | Plain


def normalize(row: Any, data: DataConfig) -> Example:
    """The row as a chat or as plain text, by `data.format` (one of causal_lm's formats)."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    _refuse_what_is_not_text_sft(row, data)
    return NORMALIZERS[data.format](row, data, lambda name: data.fields.get(name, name))


def _text(row: dict, data: DataConfig, fields) -> Plain:
    text = _required(row, fields("text"), str)
    if not text.strip():
        raise BadRow("empty_text", f"'{fields('text')}' is empty")
    return Plain([(text, True)])


def _refuse_what_is_not_text_sft(row: dict, data: DataConfig) -> None:
    """Preference pairs, KTO-labelled answers and image/audio/video columns would otherwise train as
    plain SFT rows (their pair, their label, their media ignored)."""
    if "chosen" in row and "rejected" in row:
        raise BadRow("preference_data", f"'chosen'/'rejected': {NOT_SFT} (a DPO-style pair; keep only "
                     "the chosen conversation as messages to fine-tune on it)")
    for key in ("label", "kto_tag"):
        if isinstance(row.get(key), bool):
            raise BadRow("preference_data", f"'{key}': {NOT_SFT} (a KTO-style good/bad label; keep only "
                         "the rows labelled true, without the label, to fine-tune on them)")
    for key in MEDIA_COLUMNS:
        if row.get(key):
            raise BadRow("media_data", f"'{key}': {_MEDIA_POINTER}")


_MEDIA_POINTER = ("images, audio and video train under a vision-language or speech model task, not this "
                  "text format; remove the column (and its <image>-style placeholders) to train on the text")


def _messages(row: dict, data: DataConfig, fields) -> Chat:
    chat = _turns(_required(row, fields("messages"), list), data, fields("messages"))
    system = _optional_text(row, fields("system"))
    if system:  # ShareGPT's row-level system prompt
        if chat.messages[0]["role"] == "system":
            raise BadRow("two_system_prompts", f"'{fields('system')}' and a system turn in "
                         f"'{fields('messages')}': keep one")
        chat = Chat([{"role": "system", "content": system}, *chat.messages], chat.tools,
                    tuple(i + 1 for i in chat.unsupervised))
    tools = row_tools(row.get(fields("tools")), fields("tools"))
    return Chat(chat.messages, tools, chat.unsupervised)


def extra_fields(row: Any, data: DataConfig) -> list[str]:
    """The row's columns (and its turns' keys, as `messages[].key`) that no part of its format reads:
    counted and reported, so that a column the user expected to matter is never ignored in silence."""
    if not isinstance(row, dict):
        return []
    known = {data.fields.get(name, name) for name in FORMAT_FIELDS[data.format]}
    extra = sorted(k for k, v in row.items() if k not in known and v is not None and k not in MEDIA_COLUMNS)
    turns = row.get(data.fields.get("messages", "messages")) if data.format == "messages" else None
    if isinstance(turns, list):
        turn_known = {data.fields.get("role", "role"), data.fields.get("content", "content"), "weight", *TURN_KEYS}
        keys = {k for turn in turns if isinstance(turn, dict) for k, v in turn.items()
                if k not in turn_known and v is not None}  # (Arrow gives every turn every key, null where absent)
        extra += [f"{data.fields.get('messages', 'messages')}[].{k}" for k in sorted(keys)]
    return extra


def _required(row: dict, field: str, kind: type) -> Any:
    if row.get(field) is None:
        raise BadRow("missing_field", f"no '{field}' field")
    value = row[field]
    if not isinstance(value, kind):
        reason = "non_string_content" if kind is str else "wrong_type"
        raise BadRow(reason, f"'{field}' is {type(value).__name__}, expected {kind.__name__}")
    return value


def _turns(messages: list, data: DataConfig, field: str, need_assistant: bool = True) -> Chat:
    if not messages:
        raise BadRow("empty_conversation", f"'{field}' is an empty list")
    role_key, content_key = data.fields.get("role", "role"), data.fields.get("content", "content")
    turns, unsupervised = [], []
    for i, turn in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict) or turn.get(role_key) is None or content_key not in turn:
            raise BadRow("missing_field", f"{where} needs '{role_key}' and '{content_key}'")
        role = data.roles.get(turn[role_key], SHAREGPT_ROLES.get(turn[role_key], turn[role_key]))
        if role == FUNCTION_CALL:
            turns.append(function_call_turn(turn[content_key], f"{where}.{content_key}"))
            continue
        if role not in ROLES:
            raise BadRow("unknown_role", f"{where}.{role_key} is {turn[role_key]!r}; expected one of "
                         f"{ROLES} (map other names with data.roles)")
        turns.append(_turn(turn, role, content_key, where))
        if _weight(turn, where) == 0 and role == "assistant":
            unsupervised.append(i)
    learned = [i for i, t in enumerate(turns) if t["role"] == "assistant" and i not in unsupervised]
    if need_assistant and not learned:
        detail = "every assistant turn has weight 0" if unsupervised else \
            "the conversation has no assistant turn to learn from"
        raise BadRow("no_assistant_turn", detail)
    return Chat(turns, None, tuple(unsupervised))


def _turn(turn: dict, role: str, content_key: str, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role}
    if turn.get("tool_calls") and role == "assistant":
        out["tool_calls"] = tool_calls(turn["tool_calls"], f"{where}.tool_calls")
        content = turn[content_key] if turn[content_key] is not None else ""  # OpenAI: null beside tool calls
    else:
        content = turn[content_key]
    out["content"] = _content(content, f"{where}.{content_key}")
    for key in ("tool_call_id", "name"):
        if turn.get(key) is not None:
            out[key] = turn[key]
    reasoning = turn.get("reasoning_content")
    if reasoning:
        if not isinstance(reasoning, str) or role != "assistant":
            raise BadRow("wrong_type", f"{where}.reasoning_content must be a string, on an assistant turn")
        out["reasoning_content"] = reasoning
    return out


def _weight(turn: dict, where: str) -> int:
    weight = 1 if turn.get("weight") is None else turn["weight"]  # (a table's null: the turn had none)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise BadRow("wrong_type", f"{where}.weight is {weight!r}; expected 0 (not learned) or 1")
    return weight


def _content(content: Any, where: str) -> str:
    """A turn's text: its string, or its text parts joined (OpenAI and LLaMA-Factory v1 content parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content or \
            not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content):
        raise BadRow("non_string_content", f"{where} is {type(content).__name__}, expected a string or "
                     "a list of content parts")
    for k, part in enumerate(content):
        if part["type"] in MEDIA_PARTS:
            raise BadRow("media_content", f"{where}[{k}] is an {part['type']} part: {_MEDIA_POINTER}")
        if part["type"] != "text" or not isinstance(part.get("text"), str):
            raise BadRow("non_string_content", f"{where}[{k}] is a {part['type']!r} part; only text parts "
                         "are read")
    return "".join(part["text"] for part in content)


def _alpaca(row: dict, data: DataConfig, fields) -> Chat:
    instruction = _required(row, fields("instruction"), str)
    output = _required(row, fields("output"), str)
    extra = _optional_text(row, fields("input"))
    system = _optional_text(row, fields("system"))
    user = f"{instruction}\n\n{extra}" if extra else instruction
    turns = [{"role": "system", "content": system}] if system else []
    turns += _history(row.get(fields("history")), fields("history"))
    return Chat(turns + [{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _history(value: Any, field: str) -> list[dict[str, str]]:
    """Alpaca's `history`: earlier [instruction, response] pairs, before the row's own turn."""
    if not value:
        return []
    pairs = value if isinstance(value, list) else None
    if pairs is None or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p)
                                for p in pairs):
        raise BadRow("wrong_type", f"'{field}' must be a list of [instruction, response] string pairs")
    return [turn for user, answer in pairs
            for turn in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]


def _optional_text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is not None and not isinstance(value, str):
        raise BadRow("non_string_content", f"'{field}' is {type(value).__name__}, expected a string")
    return (value or "").strip()


def _prompt_completion(row: dict, data: DataConfig, fields) -> Example:
    """Strings are plain text (prompt + completion); lists of turns are a conversation (as in TRL)."""
    prompt, completion = row.get(fields("prompt")), row.get(fields("completion"))
    if isinstance(prompt, list) and isinstance(completion, list):
        first = _turns(prompt, data, fields("prompt"), need_assistant=False)
        second = _turns(completion, data, fields("completion"))
        offset = len(first.messages)
        # As in TRL, only the completion is learned: assistant turns of the prompt are context.
        in_prompt = [i for i, turn in enumerate(first.messages) if turn["role"] == "assistant"]
        return Chat(first.messages + second.messages, None,
                    (*in_prompt, *(offset + i for i in second.unsupervised)))
    prompt = _required(row, fields("prompt"), str)
    completion = _required(row, fields("completion"), str)
    if not completion:
        raise BadRow("empty_completion", f"'{fields('completion')}' is empty")
    return Plain([(prompt, data.loss_on == "all"), (completion, True)])


# Each text format's reader (the formats of causal_lm; the classifiers' formats have their own encoders).
NORMALIZERS = {"messages": _messages, "alpaca": _alpaca, "prompt_completion": _prompt_completion, "text": _text}
