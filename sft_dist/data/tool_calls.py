"""Tool calling in the shapes datasets bring, normalized to the one that `apply_chat_template(tools=...)`
and the published tool-aware templates (Qwen2.5, Hermes, Llama 3.1, Mistral) read:

- a row's `tools`: a list of JSON schemas (OpenAI `{"type": "function", "function": {...}}` or bare
  `{"name", "description", "parameters"}`), or that list as a JSON string (LLaMA-Factory);
- an assistant turn's `tool_calls`: OpenAI's `[{"id", "type": "function", "function": {"name",
  "arguments"}}]`, with `arguments` a JSON string (OpenAI) or an object; the arguments are parsed into
  an object, which is what the templates render with `tojson`;
- ShareGPT's `function_call` turn (its value a JSON `{"name", "arguments"}` or a list of them) becomes an
  assistant turn with those tool calls; its `observation` turn a `tool` turn.
"""

from __future__ import annotations

import json
from typing import Any

from sft_dist.data.badrows import BadRow


def row_tools(value: Any, field: str) -> list[dict] | None:
    """The row's tool schemas, or None when it has none."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = _json(value, f"'{field}'")
    if not isinstance(value, list) or not all(isinstance(tool, dict) and tool_name(tool) for tool in value):
        raise BadRow("wrong_type", f"'{field}' must be a list of tool schemas, each with a name "
                     "(or that list as a JSON string)")
    return value


def tool_name(schema: dict) -> str | None:
    """A schema's or a call's function name, in either the OpenAI (nested `function`) or the flat shape."""
    inner = schema.get("function") if isinstance(schema.get("function"), dict) else schema
    name = inner.get("name")
    return name if isinstance(name, str) and name else None


def tool_calls(value: Any, where: str) -> list[dict]:
    """OpenAI `tool_calls` (or a ShareGPT function_call's parsed value): each as {type, function: {name,
    arguments: an object}}, its `id` kept (Mistral's template renders it)."""
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise BadRow("wrong_type", f"{where} is an empty list")
    normalized = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict) or tool_name(call) is None:
            raise BadRow("wrong_type", f"{where}[{k}] needs a function name")
        inner = call.get("function") if isinstance(call.get("function"), dict) else call
        arguments = inner.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _json(arguments, f"{where}[{k}].arguments") if arguments.strip() else {}
        if not isinstance(arguments, dict):
            raise BadRow("wrong_type", f"{where}[{k}].arguments is {type(arguments).__name__}, expected an object")
        normalized.append({**({"id": call["id"]} if call.get("id") else {}), "type": "function",
                           "function": {"name": tool_name(call), "arguments": arguments}})
    return normalized


def function_call_turn(value: Any, where: str) -> dict[str, Any]:
    """A ShareGPT `function_call` turn: an assistant turn that only calls tools."""
    parsed = _json(value, where) if isinstance(value, str) else value
    return {"role": "assistant", "content": "", "tool_calls": tool_calls(parsed, where)}


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRow("malformed_json", f"{where} is not JSON: {err.msg} (column {err.colno})") from None
