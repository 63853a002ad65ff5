"""Conversations to token ids with labels, through the tokenizer's own chat template.

The supervised spans come from the template itself, not from per-model role strings: rendering the
conversation up to an assistant turn (with the generation prompt) and up to the end of that turn gives
the turn's character span in the full rendering; the offsets of a single tokenization of the full text
map that span to tokens. Trailing whitespace after the turn's end token (ChatML's newline) is not
supervised: the model should learn to stop, not to emit the separator.
"""

from __future__ import annotations

from typing import Any

from sft_dist.data.sources import BadRow

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans in `text` (the full rendering) of each assistant turn, its end marker included."""
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through.rstrip())):
            raise BadRow(
                "template_not_prefix_stable",
                "the chat template renders earlier turns differently in longer conversations",
            )
        spans.append((len(before), len(through.rstrip())))
    return spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_seq_len: int, loss_on: str
) -> dict[str, Any]:
    """Token ids and labels (IGNORE_INDEX outside supervised spans), right-truncated to max_seq_len."""
    text = render(tokenizer, messages)
    # The template already holds any BOS/EOS it wants; adding special tokens again would double them.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if loss_on == "all":
        labels = list(ids)
    else:
        spans = assistant_char_spans(tokenizer, messages, text)
        labels = [
            tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
            for tok, (start, _end) in zip(ids, offsets)
        ]
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    num_supervised = sum(label != IGNORE_INDEX for label in labels[1:])  # position 0 predicts nothing
    return {"input_ids": ids, "labels": labels, "num_supervised": num_supervised, "truncated": truncated}


def generation_prompt(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Split a conversation before its last assistant turn: (prompt turns, expected answer)."""
    last = max(i for i, t in enumerate(messages) if t["role"] == "assistant")
    return messages[:last], messages[last]["content"]
