"""Labelled data for classification heads: the label names (from `model.labels`, else read from the
training data), and the encoder that turns `classification` rows (a text or a text pair and a label)
and `token_classification` rows (words and one BIO/IOB2 tag per word) into token ids with label ids.

Saved rows keep the causal LM layout, so batching is shared: `labels` holds the one label id of a
sequence-classification example, or one label per token for token classification (-100 where nothing
is predicted: special tokens and, by default, every sub-token of a word but the first).
With a tokenizer whose model takes token type ids (BERT), rows also hold them (a text pair's second
text is type 1), and the collator pads them into every batch.
`num_supervised` is what the training loss is normalised by: 1 per example for sequence
classification (so the loss is a mean over the global batch's examples), the labelled tokens for
token classification.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import datasets

from sft_dist.config import DataConfig, ModelConfig, RunConfig
from sft_dist.data.badrows import BadRow
from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.data.encode import FEATURES, drop, encode_rows, raw_row
from sft_dist.data.sources import open_source
from sft_dist.errors import UserError
from sft_dist.tasks import task_of

OUTSIDE = "O"  # the BIO tag of a word outside every entity
# With a tokenizer whose model takes token type ids (BERT: 0 for the text, 1 for its pair).
TYPED_FEATURES = datasets.Features({**FEATURES, "token_type_ids": datasets.List(datasets.Value("int8"))})


def with_labels(cfg: RunConfig) -> RunConfig:
    """The config with `model.labels` filled in for a classification task, so that every worker, every
    checkpoint's config and the exported model name the same labels in the same order."""
    if not task_of(cfg).labelled:
        return cfg
    names = label_names(cfg.data, cfg.model)
    weights = cfg.train.class_weights
    if weights and len(weights) != len(names):
        raise UserError(f"{len(weights)} weights for {len(names)} labels ({', '.join(names[:10])})",
                        key="train.class_weights")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"labels": names, "num_labels": None})})


def label_names(data: DataConfig, model: ModelConfig) -> list[str]:
    """The label names in id order: `model.labels`, else the distinct names in the training data
    (sorted; "O" first for tags), else `LABEL_i` for integer ids (`model.num_labels`, or the largest id + 1)."""
    if model.labels:
        return list(model.labels)
    if not task_of(data).labels_in_rows:
        raise UserError(f"model.labels must name the classes of {task_of(data).name}, in id order", key="model.labels")
    names, ids = _training_labels(data)
    if names:
        ordered = sorted(names, key=lambda n: (n != OUTSIDE, n)) if _tagged(data) \
            else sorted(names)
        if model.num_labels is not None and model.num_labels != len(ordered):
            raise UserError(f"{model.num_labels} labels asked for, but the training data names {len(ordered)}: "
                            f"{ordered[:10]}", key="model.num_labels")
        return ordered
    if not ids:
        raise UserError(f"no labels found in the training data (field '{_label_field(data)}')", key="data.train")
    count = model.num_labels or max(ids) + 1
    if count < 2:
        raise UserError("a classifier needs two or more labels; set model.num_labels or model.labels",
                        key="model.num_labels")
    return [f"LABEL_{i}" for i in range(count)]


def _label_field(data: DataConfig) -> str:
    canonical = task_of(data).label_field
    return data.fields.get(canonical, canonical)


def _tagged(data: DataConfig) -> bool:
    """The rows name a label per word (BIO tags), not one per row."""
    return task_of(data).label_field == "tags"


def _training_labels(data: DataConfig) -> tuple[set[str], set[int]]:
    """The label names and integer ids used in the training sources (unreadable rows are left to the encoder)."""
    field, names, ids = _label_field(data), set(), set()
    with tempfile.TemporaryDirectory(prefix="sft-dist-labels-") as work:
        for source in data.train_sources():
            parts, _problems = open_source(source, data.streaming, Path(work))
            for part in parts:
                for batch in _label_column(part.dataset, field).iter(batch_size=1000):
                    for j in range(len(next(iter(batch.values())))):
                        try:
                            row = raw_row(batch, j)
                        except BadRow:
                            continue
                        value = row.get(field) if isinstance(row, dict) else None
                        tags = isinstance(value, list) and _tagged(data)
                        for item in value if tags else [value]:
                            if isinstance(item, str):
                                names.add(item)
                            elif isinstance(item, int) and not isinstance(item, bool):
                                ids.add(item)
    return names, ids


def _label_column(dataset: Any, field: str) -> Any:
    """Only the label column of a table (an image column would otherwise be read and decoded); JSON
    rows are one text column, parsed by `raw_row`."""
    return dataset.select_columns([field]) if field in (dataset.column_names or ()) else dataset


class LabelEncoder:
    """What `datasets.map` runs over labelled rows: same output columns as the chat/text `Encoder`."""

    def __init__(self, data: DataConfig, tokenizer: Any, names: list[str]):
        self.data, self.tokenizer, self.names = data, tokenizer, names
        self.ids = {name: i for i, name in enumerate(names)}
        typed = tokenizer is not None and "token_type_ids" in tokenizer.model_input_names
        self.features = TYPED_FEATURES if typed else FEATURES

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return encode_rows(batch, indices, self.features, self._keep)

    def _keep(self, out: dict, j: int, row: dict) -> None:
        if _tagged(self.data):
            self._keep_tokens(out, j, *self._token_row(row))
        else:
            self._keep_sequence(out, j, *self._sequence_row(row))

    def _field(self, name: str) -> str:
        return self.data.fields.get(name, name)

    def label_id(self, value: Any, where: str) -> int:
        """A label given by name or by id; an unknown name or an id out of range is a bad row."""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadRow("wrong_type", f"{where} is {type(value).__name__}, expected a label name or id")
        if isinstance(value, int):
            if not 0 <= value < len(self.names):
                raise BadRow("label_out_of_range", f"{where} is {value}, outside 0..{len(self.names) - 1}")
            return value
        if value not in self.ids:
            raise BadRow("unknown_label", f"{where} is {value!r}, not one of the labels {self.names[:20]} "
                         "(set model.labels to name them all)")
        return self.ids[value]

    # ------------------------------------------------------------ sequence classification

    def _sequence_row(self, row: dict) -> tuple[str, str | None, int]:
        text_key, pair_key, label_key = self._field("text"), self._field("text_pair"), self._field("label")
        text = row.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise BadRow("missing_field" if text is None else "empty_text",
                         f"'{text_key}' must be a non-empty string")
        pair = row.get(pair_key)
        if pair is not None and not isinstance(pair, str):
            raise BadRow("non_string_content", f"'{pair_key}' is {type(pair).__name__}, expected a string")
        if row.get(label_key) is None:
            raise BadRow("missing_field", f"no '{label_key}' field")
        return text, pair, self.label_id(row[label_key], f"'{label_key}'")

    def _keep_sequence(self, out: dict, j: int, text: str, pair: str | None, label: int) -> None:
        encoded = self.tokenizer(text, pair)
        truncated = len(encoded["input_ids"]) > self.data.max_seq_len
        if truncated and self._dropped_as_too_long(out, j, len(encoded["input_ids"])):
            return
        if truncated:  # the tokenizer truncates (longest first for pairs) and keeps [CLS]/[SEP] in place
            encoded = self.tokenizer(text, pair, truncation=True, max_length=self.data.max_seq_len)
        self._store(out, j, encoded, [label], 1, truncated, [text, pair, label])

    # ------------------------------------------------------------ token classification

    def _token_row(self, row: dict) -> tuple[list[str], list[int]]:
        tokens_key, tags_key = self._field("tokens"), self._field("tags")
        words, tags = row.get(tokens_key), row.get(tags_key)
        for key, value in ((tokens_key, words), (tags_key, tags)):
            if value is None:
                raise BadRow("missing_field", f"no '{key}' field")
            if not isinstance(value, list):
                raise BadRow("wrong_type", f"'{key}' is {type(value).__name__}, expected a list")
        if not words:
            raise BadRow("empty_tokens", f"'{tokens_key}' is an empty list")
        if len(words) != len(tags):
            raise BadRow("tag_length_mismatch", f"{len(words)} '{tokens_key}' but {len(tags)} '{tags_key}'")
        if not all(isinstance(w, str) for w in words):
            raise BadRow("non_string_content", f"'{tokens_key}' must be a list of strings")
        return words, [self.label_id(tag, f"'{tags_key}'[{k}]") for k, tag in enumerate(tags)]

    def _keep_tokens(self, out: dict, j: int, words: list[str], tags: list[int]) -> None:
        encoded = self.tokenizer(words, is_split_into_words=True)
        truncated = len(encoded["input_ids"]) > self.data.max_seq_len
        if truncated and self._dropped_as_too_long(out, j, len(encoded["input_ids"])):
            return
        if truncated:
            encoded = self.tokenizer(words, is_split_into_words=True, truncation=True,
                                     max_length=self.data.max_seq_len)
        labels = aligned_labels(encoded.word_ids(), tags, self.data.label_all_subtokens)
        supervised = sum(label != IGNORE_INDEX for label in labels)
        if supervised == 0:
            drop(out, j, "no_supervised_tokens", "no word left with a label (after truncation)")
            return
        self._store(out, j, encoded, labels, supervised, truncated, [words, tags])

    # ------------------------------------------------------------ shared

    def _dropped_as_too_long(self, out: dict, j: int, length: int) -> bool:
        if self.data.truncation != "drop":
            return False
        drop(out, j, "too_long", f"{length} tokens > data.max_seq_len {self.data.max_seq_len}")
        out["length"][j] = length
        return True

    def _store(self, out: dict, j: int, encoded: Any, labels: list[int], supervised: int, truncated: bool,
               content: list[Any]) -> None:
        ids = encoded["input_ids"]
        out["input_ids"][j], out["labels"][j], out["num_supervised"][j] = list(ids), labels, supervised
        out["length"][j], out["truncated"][j], out["bad"][j] = len(ids), truncated, False
        if "token_type_ids" in self.features:
            out["token_type_ids"][j] = encoded["token_type_ids"]
        # Fixed by the content, as for chat rows: a held-out fraction never has a copy of an eval row in training.
        digest = hashlib.blake2b(json.dumps(content).encode(), digest_size=8).digest()
        out["heldout_u"][j] = int.from_bytes(digest, "big") / 2**64


def aligned_labels(word_ids: list[int | None], tags: list[int], all_subtokens: bool = False) -> list[int]:
    """One label per token: the word's tag on its first sub-token (on all of them with `all_subtokens`),
    -100 on special tokens and on the other sub-tokens, which the loss and the metrics skip."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous or all_subtokens:
            labels.append(tags[word])
        else:
            labels.append(IGNORE_INDEX)
        previous = word
    return labels
