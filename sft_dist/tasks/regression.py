"""Text regression: a text (or a text pair) and a number per row; a one-output head (transformers'
`problem_type: regression`), squared error summed per example, validation MSE and MAE from summed errors.

The whole task is this module (and its line in `sft_dist.tasks.TASKS`): its rows keep the text layout,
with the number in a `value` column that the batch maker turns into the labels.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from sft_dist.tasks import Task


class ValueEncoder:
    """What `datasets.map` runs over `regression` rows: token ids, and the row's number as `value`."""

    def __init__(self, data: Any, tokenizer: Any):
        import datasets

        from sft_dist.data.encode import FEATURES
        from sft_dist.data.labels import TYPED_FEATURES

        self.data, self.tokenizer = data, tokenizer
        typed = "token_type_ids" in tokenizer.model_input_names
        self.features = datasets.Features({**(TYPED_FEATURES if typed else FEATURES),
                                           "value": datasets.Value("float32")})
        self.text_key, self.pair_key, self.value_key = (data.fields.get(k, k) for k in ("text", "text_pair", "value"))

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        from sft_dist.data.encode import encode_rows

        return encode_rows(batch, indices, self.features, self._keep)

    def _keep(self, out: dict, j: int, row: dict) -> None:
        from sft_dist.data.badrows import BadRow
        from sft_dist.data.encode import drop

        text, pair, value = row.get(self.text_key), row.get(self.pair_key), row.get(self.value_key)
        if not isinstance(text, str) or not text.strip():
            raise BadRow("missing_field" if text is None else "empty_text",
                         f"'{self.text_key}' must be a non-empty string")
        if pair is not None and not isinstance(pair, str):
            raise BadRow("non_string_content", f"'{self.pair_key}' is {type(pair).__name__}, expected a string")
        if value is None:
            raise BadRow("missing_field", f"no '{self.value_key}' field")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadRow("wrong_type", f"'{self.value_key}' is {value!r}, expected a finite number")
        encoded = self.tokenizer(text, pair)
        length, limit = len(encoded["input_ids"]), self.data.max_seq_len
        if length > limit and self.data.truncation == "drop":
            drop(out, j, "too_long", f"{length} tokens > data.max_seq_len {limit}")
            out["length"][j] = length
            return
        if length > limit:  # the tokenizer truncates (longest first for pairs) and keeps [CLS]/[SEP] in place
            encoded = self.tokenizer(text, pair, truncation=True, max_length=limit)
        ids = list(encoded["input_ids"])
        out["input_ids"][j], out["labels"][j], out["num_supervised"][j], out["value"][j] = ids, [], 1, float(value)
        out["length"][j], out["truncated"][j], out["bad"][j] = len(ids), length > limit, False
        if "token_type_ids" in self.features:
            out["token_type_ids"][j] = encoded["token_type_ids"]
        digest = hashlib.blake2b(json.dumps([text, pair, value]).encode(), digest_size=8).digest()
        out["heldout_u"][j] = int.from_bytes(digest, "big") / 2**64  # fixed by the content (held-out split)


@dataclass(frozen=True)
class ValueBatches:
    """Padded token rows (as text classification's) whose labels are the rows' numbers."""

    text: Any  # data.batches.TextBatches

    def __call__(self, rows: dict[str, list], indices: Any = None, step: int | None = None) -> dict[str, Any]:
        import torch

        batch = self.text(rows, indices, step)
        batch["labels"] = torch.tensor(rows["value"], dtype=torch.float32)
        return batch


def squared_error_sums(logits: Any, values: Any) -> tuple[Any, Any, Any]:
    """(summed squared error, examples, 0): the loop divides the sum by the global batch's examples."""
    import torch

    error = logits.float().squeeze(-1) - values.float()
    return (error**2).sum(), torch.tensor(len(values)), torch.tensor(0)


class ErrorCounts:
    """Summed squared error, summed absolute error, examples."""

    size = 3

    def counts(self, logits: Any, values: Any) -> Any:
        import torch

        error = (logits.float().squeeze(-1) - values.float()).double().cpu()
        return torch.stack([(error**2).sum(), error.abs().sum(), torch.tensor(float(len(error)), dtype=torch.float64)])

    def metrics(self, totals: list[float]) -> dict[str, float]:
        squared, absolute, examples = totals
        return {"eval_loss": squared / examples, "eval_mse": squared / examples, "eval_mae": absolute / examples,
                "eval_examples": int(examples)}


def value_batches(cfg: Any, tokenizer: Any, module: Any) -> ValueBatches:
    from sft_dist.tasks.causal_lm import text_batches

    return ValueBatches(text_batches(cfg, tokenizer, module))


TASK = Task(
    name="regression", auto_class="AutoModelForSequenceClassification", peft_task_type="SEQ_CLS",
    pipeline="text-classification", formats={"regression": ("text", "text_pair", "value")},
    metrics={"eval_loss": "min", "eval_mse": "min", "eval_mae": "min"},
    encoder=lambda data, tokenizer, template, labels: ValueEncoder(data, tokenizer), batches=value_batches,
    loss=lambda train: squared_error_sums, counts=lambda model: ErrorCounts(),
    head_config=lambda model: {"num_labels": 1, "problem_type": "regression"},
)
