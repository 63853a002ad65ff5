"""The heavy half of the built-in tasks (torch): classifier label configs, training losses, and the
validation counts and metrics. `sft_dist.tasks` describes the tasks and imports this lazily.

Every validation metric is made from counts that are summed over ranks (one all-reduce in
`evaluate.validate`), never from per-rank metrics: accuracy from correct/total, macro F1 from the
per-class true positives, false positives and false negatives, entity precision/recall/F1 from the
true, predicted and correctly predicted entity counts. So a metric equals the single-process figure
over the whole validation set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sft_dist.config import ModelConfig, TrainConfig
from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.modeling.loss import token_loss_sums

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def label_config(cfg: ModelConfig) -> dict[str, Any]:
    """`AutoConfig.from_pretrained` arguments of a classifier's head: the labels, named (saved with the model,
    so `pipeline(...)` answers with names)."""
    assert cfg.labels, "data.labels.with_labels names the labels on the driver"
    return {"num_labels": len(cfg.labels), "id2label": dict(enumerate(cfg.labels)),
            "label2id": {name: i for i, name in enumerate(cfg.labels)}}


# ---------------------------------------------------------------- training loss


def class_loss(train: TrainConfig, loss_sums: Callable) -> LossFn:
    """A classifier's training loss with `train.class_weights` and `train.label_smoothing`."""
    weights = torch.tensor(train.class_weights, dtype=torch.float32) if train.class_weights else None
    return lambda logits, labels: loss_sums(logits, labels, weights, train.label_smoothing)


def sequence_loss_sums(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                       label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the examples (labels: each row's label id first, then padding)."""
    targets = labels[:, 0]
    logits = logits.float()
    weight = weights.to(logits.device) if weights is not None else None
    loss_sum = F.cross_entropy(logits, targets, weight=weight, reduction="sum", label_smoothing=label_smoothing)
    return loss_sum, torch.tensor(len(targets)), (logits.argmax(-1) == targets).sum()


def tag_loss_sums(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the labelled tokens (no shift: each token is classified in place)."""
    logits = logits.float()
    weight = weights.to(logits.device) if weights is not None else None
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), weight=weight,
                               ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)
    labelled = labels != IGNORE_INDEX
    return loss_sum, labelled.sum(), ((logits.argmax(-1) == labels) & labelled).sum()


# ---------------------------------------------------------------- validation counts and metrics


class TokenCounts:
    """Causal LM: summed loss, supervised tokens, correct tokens."""

    size = 3

    def counts(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([s.double().cpu() for s in token_loss_sums(logits, labels)])

    def metrics(self, totals: list[float]) -> dict[str, float]:
        loss_sum, tokens, correct = totals
        loss = loss_sum / tokens
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_token_acc": correct / tokens,
                "eval_tokens": int(tokens)}


class SequenceCounts:
    """Sequence (and image) classification: loss sum, examples, correct, then per class TP, FP and FN."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.size = 3 + 3 * num_labels

    def counts(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum, examples, correct = sequence_loss_sums(logits, labels)
        predicted, targets = logits.argmax(-1).cpu(), labels[:, 0].cpu()
        classes = torch.arange(self.num_labels)[:, None]
        tp = ((predicted == classes) & (targets == classes)).sum(1)
        fp = ((predicted == classes) & (targets != classes)).sum(1)
        fn = ((predicted != classes) & (targets == classes)).sum(1)
        head = torch.stack([loss_sum.double().cpu(), examples.double(), correct.double().cpu()])
        return torch.cat([head, tp.double(), fp.double(), fn.double()])

    def metrics(self, totals: list[float]) -> dict[str, float]:
        loss_sum, examples, correct = totals[:3]
        c = self.num_labels
        tp, fp, fn = totals[3 : 3 + c], totals[3 + c : 3 + 2 * c], totals[3 + 2 * c :]
        return {"eval_loss": loss_sum / examples, "eval_accuracy": correct / examples,
                "eval_macro_f1": macro_f1(tp, fp, fn), "eval_examples": int(examples)}


def macro_f1(tp: list[float], fp: list[float], fn: list[float]) -> float:
    """The mean F1 over the classes that occur in the targets or the predictions (as scikit-learn's
    `f1_score(average="macro")` without `labels`); a class with no true positive scores 0."""
    scores = [2 * t / (2 * t + p + n) for t, p, n in zip(tp, fp, fn) if t + p + n > 0]
    return sum(scores) / len(scores) if scores else 0.0


class EntityCounts:
    """Token classification: loss sum, labelled tokens, correct tokens, then true, predicted and correctly
    predicted entities (seqeval's spans over the labelled tokens, i.e. the first sub-token of each word)."""

    size = 6

    def __init__(self, names: list[str]):
        self.names = names

    def counts(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum, tokens, correct = tag_loss_sums(logits, labels)
        predicted, labels = logits.argmax(-1).cpu(), labels.cpu()
        entity_counts = [0, 0, 0]
        for row_pred, row_true in zip(predicted, labels):
            keep = row_true != IGNORE_INDEX
            true = set(entities([self.names[i] for i in row_true[keep].tolist()]))
            pred = set(entities([self.names[i] for i in row_pred[keep].tolist()]))
            entity_counts = [entity_counts[0] + len(true), entity_counts[1] + len(pred),
                             entity_counts[2] + len(true & pred)]
        head = [loss_sum.double().cpu(), tokens.double().cpu(), correct.double().cpu()]
        return torch.cat([torch.stack(head), torch.tensor(entity_counts, dtype=torch.float64)])

    def metrics(self, totals: list[float]) -> dict[str, float]:
        loss_sum, tokens, correct, true, predicted, hit = totals
        precision = hit / predicted if predicted else 0.0
        recall = hit / true if true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"eval_loss": loss_sum / tokens, "eval_token_acc": correct / tokens,
                "eval_entity_precision": precision, "eval_entity_recall": recall, "eval_entity_f1": f1,
                "eval_entities": int(true)}


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) spans of a tag sequence, as seqeval's default (IOB2, non-strict) `get_entities`:
    an I- after O or after another type starts an entity; a type change ends one."""
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        mark, kind = tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"
        if _chunk_ends(prev_tag, mark, prev_type, kind):
            chunks.append((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, mark, prev_type, kind):
            begin = i
        prev_tag, prev_type = mark, kind
    return chunks


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != kind))


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    return (tag in ("B", "S") or (prev_tag in ("E", "S") and tag in ("E", "I"))
            or (prev_tag == "O" and tag in ("E", "I")) or (tag not in ("O", ".") and prev_type != kind))
