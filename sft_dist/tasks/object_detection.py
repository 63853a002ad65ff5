"""Object detection (DETR-style, AutoModelForObjectDetection): an image and its objects (COCO boxes
[x, y, w, h] in pixels, categories) per row (sft_dist.data.detection). The loss is the model's own
(its Hungarian matching of queries to boxes); validation gathers every rank's per-image predictions
and pycocotools scores the whole set once: mAP (IoU 0.50:0.95) and mAP@50."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task
from sft_dist.tasks.sequence_classification import label_config


def detection_encoder(data: Any, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    from sft_dist.data.detection import DetectionEncoder

    return DetectionEncoder(data, labels)


def detection_batches(cfg: Any, tokenizer: Any, module: Any) -> Any:
    from sft_dist.data.detection import DetectionBatches
    from sft_dist.modeling import model as model_lib

    return DetectionBatches(model_lib.load_image_processor(cfg.model), next(module.parameters()).dtype)


def image_loss(train: Any) -> Any:
    """The model's own loss (a mean over its micro-batch) as a sum over the micro-batch's images, which
    the loop divides by the global batch's images."""
    import torch

    return lambda outputs, labels: (outputs.loss * len(labels), torch.tensor(len(labels)), torch.tensor(0))


def detection_scores(model: Any) -> Any:
    from sft_dist.modeling import model as model_lib
    from sft_dist.tasks.vision_metrics import DetectionScores

    return DetectionScores(model_lib.load_image_processor(model), list(model.labels))


TASK = Task(
    name="object_detection", auto_class="AutoModelForObjectDetection", pipeline="object-detection",
    formats={"object_detection": ("image", "objects")},  # objects: {bbox: [[x, y, w, h], ...], category: [...]}
    metrics={"eval_map": "max", "eval_map_50": "max", "eval_map_75": "max"},
    encoder=detection_encoder, batches=detection_batches, loss=image_loss, counts=detection_scores,
    # model.labels names the categories (the rows' categories are names among them, or ids).
    head_config=label_config, label_field="objects", preprocessor="image_processor", labels_in_rows=False,
    model_loss=True, gathers=True,
    head_modules=("class_labels_classifier", "bbox_predictor"),  # DETR's heads, trained in full next to adapters
    # DETR-family models swap their backbone's batch norms for frozen copies in __init__, copying weights
    # zero.Init has already partitioned (a size mismatch): built whole, partitioned by DeepSpeed after.
    partitions=False,
)
