"""What differs between `model.task`s: the transformers class, the head's label config, the training
loss, and the validation counts and metrics. Imports neither Ray nor DeepSpeed.

Every validation metric is made from counts that are summed over ranks (one all-reduce in
`evaluate.validate`), never from per-rank metrics: accuracy from correct/total, macro F1 from the
per-class true positives, false positives and false negatives, entity precision/recall/F1 from the
true, predicted and correctly predicted entity counts. So a metric equals the single-process figure
over the whole validation set.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

from sft_dist.config import ModelConfig, TrainConfig
from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.loss import token_loss_sums

AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "image_classification": AutoModelForImageClassification,
}
# peft has no image task type: image heads are named in modules_to_save instead (IMAGE_HEADS).
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS",
                   "token_classification": "TOKEN_CLS", "image_classification": None}
# The new head's module name in transformers' image classifiers (ViT, DeiT, BEiT, Swin, ConvNeXT, ResNet...).
IMAGE_HEADS = ["classifier"]
# Tasks that classify a whole example (one label id per row): the same loss and the same metrics.
WHOLE_EXAMPLE_TASKS = ("sequence_classification", "image_classification")

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def head_config(cfg: ModelConfig) -> dict[str, Any]:
    """`AutoConfig.from_pretrained` arguments of the task's head: the labels, named (saved with the model,
    so `pipeline(...)` answers with names)."""
    if cfg.task == "causal_lm":
        return {}
    assert cfg.labels, "data.labels.with_labels names the labels on the driver"
    return {"num_labels": len(cfg.labels), "id2label": dict(enumerate(cfg.labels)),
            "label2id": {name: i for i, name in enumerate(cfg.labels)}}


def architecture(config: Any, task: str) -> str:
    """The class name `from_pretrained` of an exported folder should build (e.g. BertForSequenceClassification)."""
    return AUTO_CLASSES[task]._model_mapping[type(config)].__name__


# ---------------------------------------------------------------- training loss


def training_loss(task: str, train: TrainConfig) -> LossFn:
    """(summed loss, supervised count, correct) of a micro-batch; the loop divides the sum by the
    global batch's supervised count (tokens for causal LM, examples for sequence classification,
    labelled tokens for token classification)."""
    if task == "causal_lm":
        return lambda logits, labels: token_loss_sums(logits, labels, train.label_smoothing)
    weights = torch.tensor(train.class_weights, dtype=torch.float32) if train.class_weights else None
    smoothing = train.label_smoothing
    if task in WHOLE_EXAMPLE_TASKS:
        return lambda logits, labels: sequence_loss_sums(logits, labels, weights, smoothing)
    return lambda logits, labels: tag_loss_sums(logits, labels, weights, smoothing)


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


def eval_counts(cfg: ModelConfig) -> TokenCounts | SequenceCounts | EntityCounts:
    if cfg.task in WHOLE_EXAMPLE_TASKS:
        return SequenceCounts(len(cfg.labels))
    if cfg.task == "token_classification":
        return EntityCounts(list(cfg.labels))
    return TokenCounts()


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
