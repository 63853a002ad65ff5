"""The tasks sft_dist trains, as data: one `Task` description per `model.task`, in `TASKS`.

A description is light (names, data formats, flags, metric names) so that `sft_dist.config` can read
it without torch; its callables (row encoder, batch maker, loss, validation counts, head config) import
torch and transformers only when called. Everything that differs between tasks is a field here, so the
rest of the code asks the task (`task_of(cfg).needs_tokenizer`, `.loss(train)`, `.counts(model)`)
instead of branching on its name, and a new task is one module plus one line in `TASKS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sft_dist.config import ModelConfig


def no_head_config(model: ModelConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Task:
    name: str  # the `model.task` value
    auto_class: str  # the transformers auto class, by name (imported when a model is built)
    # data.format -> its canonical field names (data.fields maps them to a dataset's columns); the formats
    # this task trains on, and no other task does.
    formats: dict[str, tuple[str, ...]]
    metrics: dict[str, Literal["min", "max"]]  # the validation metrics it reports (eval.metric), and their better side
    pipeline: str  # the `transformers.pipeline(...)` task name of an exported folder
    # Callables, importing torch/transformers when called:
    encoder: Callable[..., Any]  # (data, tokenizer, template, labels) -> what datasets.map runs over raw rows
    batches: Callable[..., Any]  # (cfg, tokenizer, module) -> saved rows to model inputs
    loss: Callable[..., Any]  # (train cfg) -> (logits, labels) -> (summed loss, supervised count, correct)
    counts: Callable[..., Any]  # (model cfg) -> validation counts (summed over ranks) and their metrics
    head_config: Callable[..., dict[str, Any]] = no_head_config  # (model cfg) -> AutoConfig arguments of the head
    peft_task_type: str | None = None  # peft's TaskType (None: peft has none; the head goes in head_modules)
    # What the model reads, and what export saves: a tokenizer, an image processor, an audio feature
    # extractor, or a processor (AutoProcessor: a tokenizer with an image processor, a vision-language
    # model's, or with a feature extractor, a speech recogniser's).
    preprocessor: Literal["tokenizer", "image_processor", "feature_extractor", "processor"] = "tokenizer"
    # The row field that names a row's label(s) ("label", or "tags": one per word); the label names come
    # from model.labels or the training data. None: the task has no label names.
    label_field: str | None = None
    # The rows name the labels, so they can be read from the training data when model.labels is unset;
    # False (boxes' categories, mask pixel values): model.labels must name them, in id order.
    labels_in_rows: bool = True
    generates: bool = False  # eval.generate, a generation config in exports, the chat template in exports
    packs: bool = False  # data.packing is allowed
    head_modules: tuple[str, ...] = ()  # trained in full next to adapters (peft's modules_to_save)
    labels_are_tokens: bool = False  # the labels are token ids (the head's width is the vocab), not label ids
    names_architecture: bool = True  # exports name the task's class in config.architectures (a new head)
    # The model computes its loss from `labels` in its forward (DETR's matching of predictions to boxes
    # needs more than the logits): `loss` then takes the model's outputs, not its logits.
    model_loss: bool = False
    # Validation gathers per-example records from every rank (`counts` gives a scorer with `records`
    # and `metrics(records)`), for a metric that is not a sum of per-rank parts (COCO mAP ranks every
    # detection of the whole set); otherwise counts are summed over ranks.
    gathers: bool = False
    # Exports carry the model's own generation config although eval.generate does not apply (speech to text).
    saves_generation_config: bool = False
    # ZeRO-3 builds the model partitioned (deepspeed.zero.Init); False where the model's own __init__
    # reads weights it has just made (built whole on each rank, then partitioned by deepspeed.initialize).
    partitions: bool = True

    @property
    def needs_tokenizer(self) -> bool:
        return self.preprocessor in ("tokenizer", "processor")

    @property
    def reads_audio(self) -> bool:
        return any("audio" in fields for fields in self.formats.values())

    @property
    def labelled(self) -> bool:
        return self.label_field is not None

    @property
    def has_new_head(self) -> bool:
        """A head of the task's own (its width: the labels), not the model's vocabulary."""
        return self.head_config is not no_head_config

    def auto_model(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)

    def architecture(self, config: Any) -> str:
        """The class name `from_pretrained` of an exported folder should build (e.g. BertForSequenceClassification)."""
        return self.auto_model()._model_mapping[type(config)].__name__


# The task modules (sft_dist/tasks/NAME.py, each with its `TASK`), in the order errors list them.
TASK_MODULES = ("causal_lm", "sequence_classification", "token_classification", "image_classification", "regression",
                "image_text_to_text", "object_detection", "semantic_segmentation", "speech_recognition",
                "audio_classification")


def _registry() -> dict[str, Task]:
    modules = [importlib.import_module(f"sft_dist.tasks.{name}") for name in TASK_MODULES]
    return {module.TASK.name: module.TASK for module in modules}


TASKS = _registry()
# Every data.format, and the task that trains on it.
FORMAT_TASKS = {fmt: task.name for task in TASKS.values() for fmt in task.formats}


def task_of(cfg: Any) -> Task:
    """The task of a ModelConfig, a RunConfig, or a data.format (a DataConfig)."""
    if hasattr(cfg, "model"):
        cfg = cfg.model
    if hasattr(cfg, "task"):
        return TASKS[cfg.task]
    return TASKS[FORMAT_TASKS[cfg.format]]
