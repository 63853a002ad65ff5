"""Images with class masks for `semantic_segmentation` (SegFormer-style models): on the driver, each
row's image and mask are read and checked (the mask decodes, has one channel, the image's size, and
only known class ids or the ignore value); on the workers, each batch becomes the image processor's
pixel values and its resized label maps. Imports neither Ray nor DeepSpeed.

Rows: `{"image": ..., "mask": ...}`, each a path (relative to the data file), bytes, or a `datasets`
Image value. A mask is a one-channel image (mode L, P or I) whose pixel values are class ids (a
palette image's values are its indices, as in VOC and ADE20K); `ignore_index` (255 by default, the
model's `semantic_loss_ignore_index`) marks unlabelled pixels.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from sft_dist.config import DataConfig
from sft_dist.data.badrows import BadRow
from sft_dist.data.encode import FEATURES, encode_rows
from sft_dist.data.images import check_decodes, decoded, file_bytes, part_folder

SEGMENTATION_FEATURES = datasets.Features({**FEATURES, "image": datasets.Value("binary"),
                                           "mask": datasets.Value("binary")})
MASK_MODES = ("L", "P", "I", "I;16")  # one channel of integer values
IGNORE_INDEX = 255  # transformers' semantic_loss_ignore_index default


class SegmentationEncoder:
    """What `datasets.map` runs over `semantic_segmentation` rows of one data file. `names`: the classes
    (the model's labels), in id order."""

    features = SEGMENTATION_FEATURES

    def __init__(self, data: DataConfig, names: list[str], folder: Path | None = None,
                 ignore_index: int = IGNORE_INDEX):
        self.data, self.names, self.folder, self.ignore_index = data, names, folder, ignore_index
        self.image_key, self.mask_key = data.fields.get("image", "image"), data.fields.get("mask", "mask")

    def for_part(self, part_name: str) -> SegmentationEncoder:
        return SegmentationEncoder(self.data, self.names, part_folder(part_name), self.ignore_index)

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return encode_rows(batch, indices, SEGMENTATION_FEATURES, lambda out, j, row: self._store(out, j,
                                                                                                  *self._row(row)))

    def _row(self, row: dict) -> tuple[bytes, bytes]:
        image = file_bytes(row.get(self.image_key), self.image_key, self.folder)
        size = check_decodes(image, f"'{self.image_key}'")
        mask = file_bytes(row.get(self.mask_key), self.mask_key, self.folder)
        self._check_mask(mask, size)
        return image, mask

    def _check_mask(self, data: bytes, size: tuple[int, int]) -> None:
        where = f"'{self.mask_key}'"
        check_decodes(data, where)
        with Image.open(io.BytesIO(data)) as mask:
            if mask.mode not in MASK_MODES:
                raise BadRow("mask_not_single_channel", f"{where} is a {mask.mode} image; a mask has one channel "
                             f"of class ids (mode {', '.join(MASK_MODES)})")
            if mask.size != size:
                raise BadRow("mask_size_mismatch", f"{where} is {mask.size[0]}x{mask.size[1]}, the image "
                             f"{size[0]}x{size[1]}")
            values = np.unique(np.asarray(mask))
        unknown = [int(v) for v in values if not (0 <= v < len(self.names) or v == self.ignore_index)]
        if unknown:
            raise BadRow("unknown_class_id", f"{where} has class ids {unknown[:8]}; the classes are ids "
                         f"0-{len(self.names) - 1} ({', '.join(self.names[:8])}), {self.ignore_index} unlabelled")

    @staticmethod
    def _store(out: dict, j: int, image: bytes, mask: bytes) -> None:
        out["input_ids"][j], out["labels"][j], out["num_supervised"][j] = [], [], 1  # one image, one example
        out["length"][j], out["truncated"][j], out["bad"][j] = 1, False, False
        out["image"][j], out["mask"][j] = image, mask
        digest = hashlib.blake2b(image + mask, digest_size=8).digest()
        out["heldout_u"][j] = int.from_bytes(digest, "big") / 2**64


def class_ids(data: bytes) -> np.ndarray:
    """A mask's class ids, (height, width): a palette image's indices, never its colours."""
    with Image.open(io.BytesIO(data)) as mask:
        return np.asarray(mask).astype(np.int64)


# ---------------------------------------------------------------- batches (workers)


class SegmentationBatches:
    """Saved segmentation rows as model inputs: the image processor's pixel values and label maps (resized
    with the images, nearest-neighbour; `labels` as the model's loss takes them)."""

    def __init__(self, processor: Any, dtype: torch.dtype = torch.float32):
        self.processor, self.dtype = processor, dtype

    def __call__(self, rows: dict[str, list], indices: Any = None, step: int | None = None) -> dict[str, torch.Tensor]:
        out = self.processor(images=[decoded(data) for data in rows["image"]],
                             segmentation_maps=[class_ids(data) for data in rows["mask"]], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(self.dtype), "labels": out["labels"].long()}
