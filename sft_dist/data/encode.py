"""Raw rows to token ids with labels: the function `datasets.map` runs over every part of every source,
one batch at a time (in parallel processes with `data.num_proc`).

A row that cannot be used comes out with a reason instead of tokens, so bad rows are counted, or
reported with their origin, after the map and in row order, rather than raised from a worker process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np

from sft_dist.config import DataConfig, SourceConfig
from sft_dist.data.badrows import BadRow
from sft_dist.data.chat import IGNORE_INDEX, render_with_spans
from sft_dist.data.formats import Chat, Example, Plain, extra_fields, normalize

_ids = datasets.List(datasets.Value("int32"))
FEATURES = datasets.Features({
    "input_ids": _ids, "labels": _ids,
    "num_supervised": datasets.Value("int32"),  # supervised labels after position 0 (which predicts nothing)
    "length": datasets.Value("int32"), "truncated": datasets.Value("bool"),
    # Bookkeeping, removed before saving: why a row is dropped (null: kept), whether that is a bad row
    # (judged by data.on_bad_row) rather than a length or supervision drop, and where the row came from.
    "reason": datasets.Value("string"), "bad": datasets.Value("bool"), "detail": datasets.Value("string"),
    "line": datasets.Value("int64"), "row": datasets.Value("int64"),
    "heldout_u": datasets.Value("float64"),  # a uniform number from the example's content (held-out split)
    "extra_fields": datasets.List(datasets.Value("string")),  # the row's columns its format does not read
})
# The bookkeeping columns, not saved; every other column an encoder makes is (a classifier's token type
# ids, an image's bytes, a regression row's value...).
BOOKKEEPING = ("truncated", "reason", "bad", "detail", "line", "row", "heldout_u", "extra_fields")


class Encoder:
    features = FEATURES

    def __init__(self, data: DataConfig, tokenizer: Any, template: str | None):
        self.data, self.tokenizer, self.template = data, tokenizer, template
        # Plain text longer than max_seq_len, packed: windows of it train, rather than its start only.
        self.chunks_text = data.format == "text" and data.packing and data.truncation == "right"

    def for_source(self, source: SourceConfig) -> Encoder:
        """The encoder of one source: its own format, fields and roles where it sets them."""
        return Encoder(self.data.for_source(source), self.tokenizer, self.template)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts: list[tuple[int, str, list[tuple[int, int]], Example]] = []
        out = {name: [None] * len(indices) for name in FEATURES}
        for j in range(len(indices)):
            out["line"][j], out["row"][j] = (batch["_line"][j] if "_json" in batch else None), indices[j]
            try:
                row = raw_row(batch, j)
                example = normalize(row, self.data)
                out["extra_fields"][j] = extra_fields(row, self.data)  # of the rows used (a refused one says why)
                texts.append((j, *self._text(example), example))
            except BadRow as bad:
                drop(out, j, bad.reason, bad.detail, bad=True)
        for kind in (Chat, Plain):
            chosen = [t for t in texts if isinstance(t[3], kind)]
            if chosen:
                encoded = self.tokenizer([t[1] for t in chosen], add_special_tokens=kind is Plain,
                                         return_offsets_mapping=True)
                for k, (j, _text, spans, example) in enumerate(chosen):
                    ids, labels = _labels(encoded["input_ids"][k], encoded["offset_mapping"][k], spans)
                    if kind is Plain:
                        ids, labels = self._end_with_eos(ids, labels, example.segments[-1][1])
                    self._keep(out, j, ids, labels, example)
        return out

    def _text(self, example: Example) -> tuple[str, list[tuple[int, int]]]:
        if isinstance(example, Chat):
            if self.template is None:
                raise BadRow("no_chat_template", "a conversation needs a chat template; set data.chat_template")
            return render_with_spans(self.tokenizer, self.template, example.messages, self.data.loss_on,
                                     example.tools, example.unsupervised)
        spans, start = [], 0
        for text, supervised in example.segments:
            if supervised:
                spans.append((start, start + len(text)))
            start += len(text)
        return "".join(text for text, _ in example.segments), spans

    def _end_with_eos(self, ids: list[int], labels: list[int], supervised: bool) -> tuple[list[int], list[int]]:
        """Plain text ends with EOS (supervised with the text), so the model learns where an answer stops."""
        eos = self.tokenizer.eos_token_id
        if eos is None or ids[-1:] == [eos]:
            return ids, labels
        return ids + [eos], labels + [eos if supervised else IGNORE_INDEX]

    def _keep(self, out: dict, j: int, ids: list[int], labels: list[int], example: Example) -> None:
        full_length, limit = len(ids), self.data.max_seq_len
        if self.chunks_text and isinstance(example, Plain):
            limit = full_length  # kept whole: packing cuts it into windows (packing.chunk)
        if full_length > limit and self.data.truncation == "drop":
            drop(out, j, "too_long", f"{full_length} tokens > data.max_seq_len {self.data.max_seq_len}")
            out["length"][j] = full_length
            return
        # left: the prompt's start goes, the answer stays (a long prompt no longer drops the row)
        kept = slice(-limit, None) if self.data.truncation == "left" else slice(limit)
        ids, labels = ids[kept], labels[kept]
        num_supervised = sum(label != IGNORE_INDEX for label in labels[1:])  # position 0 predicts nothing
        if num_supervised == 0:
            if full_length > len(ids):  # the cut took every supervised token (e.g. a long prompt): say so
                drop(out, j, "too_long", f"{full_length} tokens > data.max_seq_len {self.data.max_seq_len}, "
                     "and cutting on the right leaves no supervised token (data.truncation: left keeps the answer)")
                out["length"][j] = full_length
            else:
                drop(out, j, "no_supervised_tokens", "no supervised token in the example")
            return
        out["input_ids"][j], out["labels"][j], out["num_supervised"][j] = ids, labels, num_supervised
        out["length"][j], out["truncated"][j], out["bad"][j] = len(ids), full_length > len(ids), False
        out["heldout_u"][j] = _uniform(example)

def drop(out: dict, j: int, reason: str, detail: str, bad: bool = False) -> None:
    """Row j comes out without tokens, with the reason (and whether that is a bad row)."""
    out["input_ids"][j], out["labels"][j], out["num_supervised"][j], out["truncated"][j] = [], [], 0, False
    out["reason"][j], out["detail"][j], out["bad"][j], out["length"][j] = reason, detail, bad, 0
    out["heldout_u"][j] = 1.0


def encode_rows(batch: dict[str, list], indices: list[int], features: Any,
                keep: Callable[[dict, int, dict], None]) -> dict[str, list]:
    """The row loop of every encoder of JSON-object rows: row j parsed (`raw_row`) and checked to be an
    object, then `keep(out, j, row)` fills its columns; a BadRow it raises drops the row with its reason."""
    out = {name: [None] * len(indices) for name in features}
    for j in range(len(indices)):
        out["line"][j], out["row"][j] = (batch["_line"][j] if "_json" in batch else None), indices[j]
        try:
            row = raw_row(batch, j)
            if not isinstance(row, dict):
                raise BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}")
            keep(out, j, row)
        except BadRow as bad:
            drop(out, j, bad.reason, bad.detail, bad=True)
    return out


def raw_row(batch: dict[str, list], j: int) -> Any:
    """Row j of a source batch: a table's columns, or a JSON line parsed here (in the map's processes)."""
    if "_json" not in batch:
        return {name: column[j] for name, column in batch.items()}
    if batch["_error"][j]:
        reason, _, detail = batch["_error"][j].partition(": ")
        raise BadRow(reason, detail)
    try:
        return json.loads(batch["_json"][j])
    except json.JSONDecodeError as err:
        raise BadRow("malformed_json", f"{err.msg}: column {err.colno}") from None


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list, list]:
    """A token is supervised when its characters overlap a supervised span (zero-width tokens never)."""
    # Vectorised over tokens: a Python test per token and span was a sixth of the encoding time.
    starts, ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).T
    supervised = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        supervised |= (starts < hi) & (ends > lo)
    return list(ids), np.where(supervised, ids, IGNORE_INDEX).tolist()


def _uniform(example: Example) -> float:
    """A number in [0, 1) fixed by the example's content: the same on every run and every machine, and
    equal for duplicate rows, so a held-out fraction never has a copy of an eval row in training."""
    if isinstance(example, Chat):
        content = json.dumps([example.messages, example.tools] if example.tools else example.messages, sort_keys=True)
    else:
        content = json.dumps(example.segments, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(content.encode(), digest_size=8).digest(), "big") / 2**64
