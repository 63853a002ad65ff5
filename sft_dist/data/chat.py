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

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as err:  # the template's own raise_exception (e.g. "roles must alternate")
        raise BadRow("template_error", str(err)) from None


def render_with_spans(
    tokenizer: Any, template: str, messages: list[dict[str, str]], loss_on: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans to supervise (every assistant turn, or everything)."""
    text = render(tokenizer, template, messages)
    if loss_on == "all":
        return text, [(0, len(text))]
    return text, [_turn_span(tokenizer, template, messages, i, text)
                  for i, turn in enumerate(messages) if turn["role"] == "assistant"]


def _turn_span(tokenizer: Any, template: str, messages: list[dict[str, str]], i: int, text: str) -> tuple[int, int]:
    """Character span of assistant turn i in `text`, its end marker included."""
    # The last turn's prefix is the whole conversation, already rendered: rendering it again would be
    # a third of the work for the usual single-turn row.
    last = i == len(messages) - 1
    through = (text if last else render(tokenizer, template, messages[: i + 1])).rstrip()
    if not text.startswith(through):
        raise BadRow("template_not_prefix_stable",
                     "the chat template renders earlier turns differently in longer conversations")
    before = render(tokenizer, template, messages[:i], generation_prompt=True) if i else None
    if before is not None and text.startswith(before) and len(before) <= len(through):
        return len(before), len(through)
    # A leading assistant turn (nothing to render before it), or a template that adds a default system
    # prompt only to non-empty conversations: find the turn's content just before its end marker.
    start = text.rfind(content_text(messages[i]["content"]).strip(), 0, len(through))
    if start < 0:
        raise BadRow("template_not_prefix_stable", f"cannot find assistant turn {i} in the rendered text")
    return start, len(through)


def content_text(content: str | list[dict]) -> str:
    """A turn's text: its string, or its text parts joined (a VLM turn's content parts)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def generation_prompt(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Split a conversation before its last assistant turn: (prompt turns, expected answer)."""
    last = max(i for i, t in enumerate(messages) if t["role"] == "assistant")
    return messages[:last], messages[last]["content"]
