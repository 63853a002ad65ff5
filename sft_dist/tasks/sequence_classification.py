"""Text (or text pair) classification: one label per row; cross-entropy per example, accuracy and macro F1."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task
from sft_dist.tasks.causal_lm import text_batches

CLASS_METRICS = {"eval_loss": "min", "eval_accuracy": "max", "eval_macro_f1": "max"}


def label_encoder(data: Any, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    from sft_dist.data.labels import LabelEncoder

    return LabelEncoder(data, tokenizer, labels)


def label_config(model: Any) -> dict[str, Any]:
    from sft_dist.tasks.heads import label_config

    return label_config(model)


def example_loss(train: Any) -> Any:
    from sft_dist.tasks.heads import class_loss, sequence_loss_sums

    return class_loss(train, sequence_loss_sums)


def class_counts(model: Any) -> Any:
    from sft_dist.tasks.heads import SequenceCounts

    return SequenceCounts(len(model.labels))


TASK = Task(
    name="sequence_classification", auto_class="AutoModelForSequenceClassification", peft_task_type="SEQ_CLS",
    pipeline="text-classification",
    formats={"classification": ("text", "text_pair", "label")},  # a text (or a pair) and a label name or id
    metrics=CLASS_METRICS, encoder=label_encoder, batches=text_batches, loss=example_loss, counts=class_counts,
    head_config=label_config, label_field="label",
)
