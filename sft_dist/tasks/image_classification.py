"""Image classification: an image and a label per row; the same loss and metrics as text classification."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task
from sft_dist.tasks.sequence_classification import CLASS_METRICS, class_counts, example_loss, label_config


def image_encoder(data: Any, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    from sft_dist.data.images import ImageEncoder

    return ImageEncoder(data, labels)


def image_batches(cfg: Any, tokenizer: Any, module: Any) -> Any:
    from sft_dist.data.images import ImageBatches
    from sft_dist.modeling import model as model_lib

    dtype = next(module.parameters()).dtype  # not every vision model casts its pixels itself
    return ImageBatches(model_lib.load_image_processor(cfg.model), cfg.data.image_augment, cfg.seed, dtype)


TASK = Task(
    name="image_classification", auto_class="AutoModelForImageClassification", pipeline="image-classification",
    # An image (a path, relative to the data file's folder or absolute, or the bytes of an image file,
    # e.g. a `datasets` Image column) and a label name or id.
    formats={"image_classification": ("image", "label")},
    metrics=CLASS_METRICS, encoder=image_encoder, batches=image_batches, loss=example_loss, counts=class_counts,
    head_config=label_config, label_field="label", preprocessor="image_processor",
    # peft has no image task type: the new head's module name in transformers' image classifiers (ViT,
    # DeiT, BEiT, Swin, ConvNeXT, ResNet...) is trained in full next to the adapters.
    head_modules=("classifier",),
)
