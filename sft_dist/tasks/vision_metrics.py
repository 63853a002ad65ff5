"""Validation metrics of the dense vision tasks, made so that a run on several ranks reports what one
process would over the whole validation set. Imports neither Ray nor DeepSpeed; the collectives are the
caller's (`runtime.all_reduce_sum`, `runtime.all_gather`).

- Semantic segmentation (`SegmentationCounts`): a loss sum, the labelled pixels and the confusion counts
  (target class x predicted class), summed over ranks like the classifiers' counts; mean IoU and pixel
  accuracy come from the summed matrix.
- Object detection (`DetectionScores`): mAP is not a sum of per-rank parts (it ranks every detection of
  the set by score), so each rank keeps plain per-image records (its predictions and the row's original
  boxes, keyed by the row's index in the validation set), the ranks' records are gathered, and
  pycocotools' COCOeval scores them once: mAP (IoU 0.50:0.95) and mAP@50.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255  # transformers' semantic_loss_ignore_index default


class SegmentationCounts:
    """Loss sum, labelled pixels, then the num_labels x num_labels confusion counts (row: target class,
    column: predicted class), over the pixels of the processed label maps."""

    def __init__(self, num_labels: int, ignore_index: int = IGNORE_INDEX):
        self.num_labels, self.ignore_index = num_labels, ignore_index
        self.size = 2 + num_labels * num_labels

    def counts(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Logits upsampled to the labels' size as the model's own loss does (SegFormer predicts at 1/4).
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss_sum = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
        keep = labels != self.ignore_index
        target, predicted = labels[keep].cpu(), logits.argmax(1)[keep].cpu()
        c = self.num_labels
        confusion = torch.bincount(target * c + predicted, minlength=c * c).double()
        return torch.cat([torch.stack([loss_sum.double().cpu(), keep.sum().double().cpu()]), confusion])

    def metrics(self, totals: list[float]) -> dict[str, float]:
        loss_sum, pixels = totals[:2]
        confusion = torch.tensor(totals[2:], dtype=torch.float64).reshape(self.num_labels, self.num_labels)
        return {"eval_loss": loss_sum / pixels, "eval_mean_iou": mean_iou(confusion),
                "eval_pixel_accuracy": float(confusion.diag().sum() / pixels), "eval_pixels": int(pixels)}


def mean_iou(confusion: torch.Tensor) -> float:
    """The mean IoU over the classes present in the targets or the predictions (as `evaluate`'s
    mean_iou and torchmetrics' JaccardIndex: a class seen in neither is left out, not scored 0)."""
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    seen = union > 0
    return float((hits[seen] / union[seen]).mean()) if seen.any() else 0.0


class DetectionScores:
    """Per-image detection records of one rank, and COCO mAP over everyone's records.

    `processor`: the model's image processor (its `post_process_object_detection` turns the model's
    outputs into boxes in the original image's pixels); `names`: the categories, in id order."""

    def __init__(self, processor: Any, names: list[str]):
        self.processor, self.names = processor, names

    def records(self, outputs: Any, batch: dict[str, Any], rows: dict[str, list], row_ids: list[int]) -> list[dict]:
        """One record per image of a validation batch: its predictions (every query's best-scoring box,
        COCO [x, y, w, h] in the original image's pixels) and its saved boxes and categories. Plain
        lists, so the records travel between ranks as they are."""
        sizes = [label["orig_size"].tolist() for label in batch["labels"]]  # (height, width)
        found = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        return [{"image_id": int(row_id), "height": int(size[0]), "width": int(size[1]),
                 "boxes": [list(map(float, b)) for b in boxes], "categories": [int(c) for c in categories],
                 "predicted_boxes": [xywh(b) for b in result["boxes"].tolist()],
                 "scores": result["scores"].tolist(), "predicted_categories": result["labels"].tolist()}
                for row_id, size, boxes, categories, result in zip(row_ids, sizes, rows["boxes"],
                                                                   rows["categories"], found)]

    def metrics(self, records: list[dict]) -> dict[str, float]:
        """mAP and mAP@50 of the records of the whole validation set (every rank's, gathered)."""
        ids = [r["image_id"] for r in records]
        if len(set(ids)) != len(ids):
            raise ValueError("an image's records were gathered twice (a padding batch counted?)")
        stats = coco_stats(records, len(self.names))
        return {"eval_map": stats[0], "eval_map_50": stats[1], "eval_map_75": stats[2], "eval_images": len(records)}


def xywh(box: list[float]) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def coco_stats(records: list[dict], num_categories: int) -> list[float]:
    """COCOeval's 12 summary numbers (AP@[.50:.95], AP@.50, AP@.75, ...) for the records; a number
    COCOeval cannot make (-1: no ground truth in that range) is reported as 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO()
    truth.dataset = coco_truth(records, num_categories)
    detections = [{"image_id": r["image_id"], "category_id": c, "bbox": b, "score": s} for r in records
                  for b, s, c in zip(r["predicted_boxes"], r["scores"], r["predicted_categories"])]
    if not detections or not truth.dataset["annotations"]:
        return [0.0] * 12
    # pycocotools prints its progress and summary table; what it computes is returned instead.
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        scoring = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        scoring.evaluate()
        scoring.accumulate()
        scoring.summarize()
    return [max(float(v), 0.0) for v in scoring.stats]


def coco_truth(records: list[dict], num_categories: int) -> dict:
    """The records' original boxes as a COCO ground-truth set. Annotation ids start at 1: COCOeval takes
    a match to annotation id 0 for no match."""
    annotations = [{"image_id": r["image_id"], "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                   for r in records for b, c in zip(r["boxes"], r["categories"])]
    for number, annotation in enumerate(annotations, start=1):
        annotation["id"] = number
    return {"images": [{"id": r["image_id"], "height": r["height"], "width": r["width"]} for r in records],
            "annotations": annotations, "categories": [{"id": i} for i in range(num_categories)]}
