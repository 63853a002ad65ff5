"""Token classification (NER): words and one BIO/IOB2 tag per word; entity precision, recall and F1."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task
from sft_dist.tasks.causal_lm import text_batches
from sft_dist.tasks.sequence_classification import label_config, label_encoder


def tag_loss(train: Any) -> Any:
    from sft_dist.tasks.heads import class_loss, tag_loss_sums

    return class_loss(train, tag_loss_sums)


def entity_counts(model: Any) -> Any:
    from sft_dist.tasks.heads import EntityCounts

    return EntityCounts(list(model.labels))


TASK = Task(
    name="token_classification", auto_class="AutoModelForTokenClassification", peft_task_type="TOKEN_CLS",
    pipeline="token-classification",
    formats={"token_classification": ("tokens", "tags")},  # words and one tag (BIO/IOB2, name or id) per word
    metrics={"eval_loss": "min", "eval_token_acc": "max", "eval_entity_precision": "max",
             "eval_entity_recall": "max", "eval_entity_f1": "max"},
    encoder=label_encoder, batches=text_batches, loss=tag_loss, counts=entity_counts, head_config=label_config,
    label_field="tags",
)
