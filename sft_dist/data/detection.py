"""Images with boxes for `object_detection` (DETR-style models): on the driver, each row's image is read
and checked to decode, and its objects checked against it (COCO boxes [x, y, width, height] in pixels,
inside the image; categories among the labels); on the workers, each batch becomes the image
processor's pixel values and its DETR targets. Imports neither Ray nor DeepSpeed.

Rows: `{"image": ..., "objects": {"bbox": [[x, y, w, h], ...], "category": [...]}}` (the layout of
the Hub's detection sets, e.g. cppe-5), categories as label names or ids. The saved rows keep the
boxes in pixels of the original image, exactly as given: the image processor turns them into its
normalised targets per batch, and validation scores predictions against these originals.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import datasets
import torch

from sft_dist.config import DataConfig
from sft_dist.data.badrows import BadRow
from sft_dist.data.encode import FEATURES, encode_rows
from sft_dist.data.images import check_decodes, decoded, file_bytes, part_folder

DETECTION_FEATURES = datasets.Features({
    **FEATURES, "image": datasets.Value("binary"),
    "boxes": datasets.List(datasets.List(datasets.Value("float32"), length=4)),  # COCO x, y, w, h in pixels
    "categories": datasets.List(datasets.Value("int32")),
})
# Boxes may reach this far past the image's edge (pixel-rounding of converted annotations) and are
# clipped to it; further out, the row is bad.
EDGE_TOLERANCE_PX = 0.5


class DetectionEncoder:
    """What `datasets.map` runs over `object_detection` rows of one data file. `names`: the categories
    (the model's labels), in id order."""

    features = DETECTION_FEATURES

    def __init__(self, data: DataConfig, names: list[str], folder: Path | None = None):
        self.data, self.names, self.folder = data, names, folder
        self.image_key, self.objects_key = data.fields.get("image", "image"), data.fields.get("objects", "objects")

    def for_part(self, part_name: str) -> DetectionEncoder:
        return DetectionEncoder(self.data, self.names, part_folder(part_name))

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return encode_rows(batch, indices, DETECTION_FEATURES, lambda out, j, row: self._store(out, j, *self._row(row)))

    def _row(self, row: dict) -> tuple[bytes, list[list[float]], list[int]]:
        data = file_bytes(row.get(self.image_key), self.image_key, self.folder)
        width, height = check_decodes(data, f"'{self.image_key}'")
        bboxes, categories = self._objects(row)
        boxes = [inside_image(box, width, height, f"{self.objects_key}.bbox[{k}]") for k, box in enumerate(bboxes)]
        ids = [self._category(c, f"{self.objects_key}.category[{k}]") for k, c in enumerate(categories)]
        return data, boxes, ids

    def _objects(self, row: dict) -> tuple[list, list]:
        objects = row.get(self.objects_key)
        if objects is None:
            raise BadRow("missing_field", f"no '{self.objects_key}' field")
        if not isinstance(objects, dict) or not isinstance(objects.get("bbox"), list) \
                or not isinstance(objects.get("category"), list):
            raise BadRow("wrong_type", f"'{self.objects_key}' must be {{bbox: [[x, y, w, h], ...], category: [...]}}")
        if len(objects["bbox"]) != len(objects["category"]):
            raise BadRow("objects_mismatch", f"'{self.objects_key}' has {len(objects['bbox'])} boxes and "
                         f"{len(objects['category'])} categories")
        return objects["bbox"], objects["category"]

    def _category(self, value: Any, where: str) -> int:
        if isinstance(value, str) and value in self.names:
            return self.names.index(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.names):
            return value
        raise BadRow("unknown_category", f"{where} is {value!r}; the categories are {self.names} (or ids "
                     f"0-{len(self.names) - 1})")

    @staticmethod
    def _store(out: dict, j: int, data: bytes, boxes: list[list[float]], ids: list[int]) -> None:
        out["input_ids"][j], out["labels"][j], out["num_supervised"][j] = [], [], 1  # one image, one example
        out["length"][j], out["truncated"][j], out["bad"][j] = 1, False, False
        out["image"][j], out["boxes"][j], out["categories"][j] = data, boxes, ids
        digest = hashlib.blake2b(data + repr((boxes, ids)).encode(), digest_size=8).digest()
        out["heldout_u"][j] = int.from_bytes(digest, "big") / 2**64


def inside_image(box: Any, width: int, height: int, where: str) -> list[float]:
    """A COCO box [x, y, w, h] of positive size within the image (clipped within EDGE_TOLERANCE_PX)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise BadRow("bad_box", f"{where} is {box!r:.60}; expected [x, y, width, height], four finite numbers")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise BadRow("bad_box", f"{where} is {box!r}: width and height must be positive")
    tol = EDGE_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise BadRow("box_outside_image", f"{where} is {box!r}, outside the {width}x{height} image")
    left, top = max(x, 0.0), max(y, 0.0)
    return [left, top, min(x + w, width) - left, min(y + h, height) - top]


def coco_annotations(boxes: list[list[float]], categories: list[int], image_id: int) -> dict:
    """One image's objects as the COCO detection annotations DETR-style image processors take."""
    return {"image_id": image_id, "annotations": [
        {"bbox": list(box), "category_id": int(c), "area": box[2] * box[3], "iscrowd": 0}
        for box, c in zip(boxes, categories)]}


# ---------------------------------------------------------------- batches (workers)


class DetectionBatches:
    """Saved detection rows as model inputs: the image processor's pixel values (and pixel mask, where
    it pads) and its targets (`labels`: per image, class labels and normalised boxes, as the model's
    loss takes them, with the original size for post-processing)."""

    def __init__(self, processor: Any, dtype: torch.dtype = torch.float32):
        self.processor, self.dtype = processor, dtype

    def __call__(self, rows: dict[str, list], indices: Any = None, step: int | None = None) -> dict[str, Any]:
        ids = range(len(rows["image"])) if indices is None else [int(i) for i in indices]
        annotations = [coco_annotations(b, c, i) for b, c, i in zip(rows["boxes"], rows["categories"], ids)]
        out = self.processor(images=[decoded(data) for data in rows["image"]], annotations=annotations,
                             return_tensors="pt")
        batch: dict[str, Any] = {"pixel_values": out["pixel_values"].to(self.dtype), "labels": list(out["labels"])}
        if "pixel_mask" in out:
            batch["pixel_mask"] = out["pixel_mask"]
        return batch
