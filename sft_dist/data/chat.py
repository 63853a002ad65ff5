"""Conversations to text with supervised character spans, through a chat template.

The supervised spans come from the template itself, not from per-model role strings: rendering the
conversation up to an assistant turn (with the generation prompt) and through the end of that turn gives
the turn's character span in the full rendering. `encode` maps spans to tokens through the offsets of
one tokenization of the full text. Trailing whitespace after the turn's end token (ChatML's newline) is
not supervised: the model should learn to stop, not to emit the separator.
"""

from __future__ import annotations

from typing import Any

import jinja2

from sft_dist.data.badrows import BadRow
from sft_dist.data.tool_calls import tool_name

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


def render(tokenizer: Any, template: str, messages: list[dict[str, Any]], generation_prompt: bool = False,
           tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as err:  # the template's own raise_exception (e.g. "roles must alternate")
        raise BadRow("template_error", str(err)) from None


def render_with_spans(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], loss_on: str,
    tools: list[dict] | None = None, unsupervised: tuple[int, ...] = (),
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans to supervise: every assistant turn (but the
    `unsupervised` ones), only the last one, or everything."""
    text = render(tokenizer, template, messages, tools=tools)
    check_rendered(text, messages, tools)
    if loss_on == "all":
        return text, [(0, len(text))]
    learned = [i for i, turn in enumerate(messages) if turn["role"] == "assistant" and i not in unsupervised]
    if loss_on == "last_assistant":
        learned = learned[-1:]
    return text, [_turn_span(tokenizer, template, messages, i, text, tools) for i in learned]


def check_rendered(text: str, messages: list[dict[str, Any]], tools: list[dict] | None) -> None:
    """A template that ignores a row's tools, tool calls or reasoning would train the row without them:
    each must show in the rendering (by its function name, or its text)."""
    for tool in tools or ():
        if tool_name(tool) not in text:
            raise BadRow("template_drops_tools", f"the chat template does not render the row's tools "
                         f"({tool_name(tool)!r} is not in the text); use a template with tool support")
    for i, turn in enumerate(messages):
        for call in turn.get("tool_calls") or ():
            if call["function"]["name"] not in text:
                raise BadRow("template_drops_tool_calls", f"messages[{i}].tool_calls: the chat template does "
                             "not render tool calls; use a template with tool support")
        if turn.get("reasoning_content") and turn["reasoning_content"].strip() not in text:
            raise BadRow("template_drops_reasoning", f"messages[{i}].reasoning_content: the chat template does "
                         "not render reasoning (or drops it from this turn); use a template that does, "
                         "or remove the field")


def _turn_span(tokenizer: Any, template: str, messages: list[dict[str, Any]], i: int, text: str,
               tools: list[dict] | None = None) -> tuple[int, int]:
    """Character span of assistant turn i in `text`, its end marker included."""
    # The last turn's prefix is the whole conversation, already rendered: rendering it again would be
    # a third of the work for the usual single-turn row.
    last = i == len(messages) - 1
    through = (text if last else render(tokenizer, template, messages[: i + 1], tools=tools)).rstrip()
    if not text.startswith(through):
        raise BadRow("template_not_prefix_stable",
                     "the chat template renders earlier turns differently in longer conversations")
    before = render(tokenizer, template, messages[:i], generation_prompt=True, tools=tools) if i else None
    if before is not None and text.startswith(before) and len(before) <= len(through):
        return len(before), len(through)
    # A leading assistant turn (nothing to render before it), or a template that adds a default system
    # prompt only to non-empty conversations: find the turn's content just before its end marker.
    content = content_text(messages[i]["content"]).strip()
    start = text.rfind(content, 0, len(through)) if content else -1
    if start < 0:
        raise BadRow("template_not_prefix_stable", f"cannot find assistant turn {i} in the rendered text")
    return start, len(through)


def content_text(content: str | list[dict]) -> str:
    """A turn's text: its string, or its text parts joined (a VLM turn's content parts)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def generation_prompt(messages: list[dict[str, Any]]) -> tuple[list[dict[str, str]], str]:
    """Split a conversation before its last assistant turn: (prompt turns, expected answer)."""
    last = max(i for i, t in enumerate(messages) if t["role"] == "assistant")
    return messages[:last], messages[last]["content"]
