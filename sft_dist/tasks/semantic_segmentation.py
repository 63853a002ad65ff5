"""Semantic segmentation (SegFormer-style, AutoModelForSemanticSegmentation): an image and its class
mask per row (sft_dist.data.segmentation). The loss is the model's own (its logits upsampled to the
label map); validation sums a confusion matrix over ranks: mean IoU and pixel accuracy."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task
from sft_dist.tasks.object_detection import image_loss
from sft_dist.tasks.sequence_classification import label_config


def segmentation_encoder(data: Any, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    from sft_dist.data.segmentation import SegmentationEncoder

    return SegmentationEncoder(data, labels)


def segmentation_batches(cfg: Any, tokenizer: Any, module: Any) -> Any:
    from sft_dist.data.segmentation import SegmentationBatches
    from sft_dist.modeling import model as model_lib

    return SegmentationBatches(model_lib.load_image_processor(cfg.model), next(module.parameters()).dtype)


def confusion_counts(model: Any) -> Any:
    from sft_dist.tasks.vision_metrics import SegmentationCounts

    return SegmentationCounts(len(model.labels))


TASK = Task(
    name="semantic_segmentation", auto_class="AutoModelForSemanticSegmentation", pipeline="image-segmentation",
    formats={"semantic_segmentation": ("image", "mask")},  # mask: a one-channel image of class ids
    metrics={"eval_loss": "min", "eval_mean_iou": "max", "eval_pixel_accuracy": "max"},
    encoder=segmentation_encoder, batches=segmentation_batches, loss=image_loss, counts=confusion_counts,
    # model.labels names the classes, in the masks' id order.
    head_config=label_config, label_field="mask", preprocessor="image_processor", labels_in_rows=False,
    model_loss=True,
    head_modules=("decode_head",),  # SegFormer's head, trained in full next to adapters
)
