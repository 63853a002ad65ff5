"""Images for `image_classification`: on the driver, each row's image (a path, relative to its data
file's folder or absolute, or the bytes of an image file, as a `datasets` Image column holds them) is
read, checked to decode, and saved as bytes with its label id; on the workers, each batch's images are
decoded, augmented (training only) and turned into pixel values by the model's own image processor.
Imports neither Ray nor DeepSpeed.

The prepared rows keep the layout of text classification (`labels` holds the one label id, one
supervised example per row, `length` 1), so batching plans, the loss and the metrics are shared; the
image bytes travel in an extra `image` column. Pixel values are made per batch, not stored: a 224x224
image is 600 KB of floats but a few KB as a file.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from sft_dist.config import DataConfig, ImageAugmentConfig
from sft_dist.data.badrows import BadRow
from sft_dist.data.encode import FEATURES, encode_rows
from sft_dist.data.labels import LabelEncoder

IMAGE_FEATURES = datasets.Features({**FEATURES, "image": datasets.Value("binary")})
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect-ratio range
CROP_TRIES = 10  # as torchvision: draws before falling back to the whole image


class ImageEncoder:
    """What `datasets.map` runs over `image_classification` rows of one data file (`folder`: where its
    relative image paths start)."""

    features = IMAGE_FEATURES

    def __init__(self, data: DataConfig, names: list[str], folder: Path | None = None):
        self.data, self.names, self.folder = data, names, folder
        self.labels = LabelEncoder(data, None, names)  # label names or ids, checked as for text classification
        self.image_key, self.label_key = data.fields.get("image", "image"), data.fields.get("label", "label")

    def for_part(self, part_name: str) -> ImageEncoder:
        """The encoder of one source part: a data file (paths relative to its folder), or a saved folder."""
        return ImageEncoder(self.data, self.names, part_folder(part_name))

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return encode_rows(batch, indices, IMAGE_FEATURES, lambda out, j, row: self._store(out, j, *self._row(row)))

    def _row(self, row: dict) -> tuple[bytes, int]:
        if row.get(self.label_key) is None:
            raise BadRow("missing_field", f"no '{self.label_key}' field")
        label = self.labels.label_id(row[self.label_key], f"'{self.label_key}'")
        data = file_bytes(row.get(self.image_key), self.image_key, self.folder)
        check_decodes(data, f"'{self.image_key}'")
        return data, label

    @staticmethod
    def _store(out: dict, j: int, data: bytes, label: int) -> None:
        out["input_ids"][j], out["labels"][j], out["num_supervised"][j] = [], [label], 1
        out["length"][j], out["truncated"][j], out["bad"][j], out["image"][j] = 1, False, False, data
        # Fixed by the content, as for text rows: a held-out fraction never has a copy of an eval row in training.
        digest = hashlib.blake2b(data + label.to_bytes(4, "big"), digest_size=8).digest()
        out["heldout_u"][j] = int.from_bytes(digest, "big") / 2**64


def part_folder(part_name: str) -> Path:
    """Where a source part's relative image paths start: its file's folder, or a saved dataset's own."""
    where = Path(part_name)
    return where if where.is_dir() else where.parent if where.exists() else Path.cwd()


def file_bytes(value: Any, key: str, folder: Path | None, wanted: str = "an image path or image bytes",
               unreadable: str = "missing_image") -> bytes:
    """An image (or mask, or audio) field's file content: a path (relative to `folder`), raw bytes, or a
    `datasets` Image/Audio value ({bytes, path}: bytes when present, else the path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        kind = "missing_field" if value is None else "wrong_type"
        raise BadRow(kind, f"'{key}' must be {wanted}, got {type(value).__name__}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() or folder is None else folder / path
    try:
        return path.read_bytes()
    except OSError as err:
        raise BadRow(unreadable, f"'{key}': cannot read {path} ({err.strerror})") from None


def check_decodes(data: bytes, where: str) -> tuple[int, int]:
    """The image's (width, height); a bad row unless the bytes decode as an image, whole (a truncated
    file fails in `load`, not `open`)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... depending on the format
        raise BadRow("unreadable_image", f"{where}: not a readable image ({type(err).__name__}: {err})") from None


def undecoded(dataset: Any, field: str) -> Any:
    """The dataset with an Image column left as {bytes, path}: decoding to PIL here would only be undone."""
    column = (dataset.features or {}).get(field)
    return dataset.cast_column(field, datasets.Image(decode=False)) if isinstance(column, datasets.Image) else dataset


# ---------------------------------------------------------------- batches (workers)


def decoded(data: bytes) -> Image.Image:
    """RGB, as `pipeline("image-classification")` reads images (transformers' `load_image`)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


@dataclass(frozen=True)
class ImageBatches:
    """Saved image rows as model inputs: pixel values from the model's image processor, and labels."""

    processor: Any
    augment: ImageAugmentConfig | None
    seed: int
    dtype: torch.dtype = torch.float32  # the model's

    def __call__(self, rows: dict[str, list], indices: Any = None, step: int | None = None) -> dict[str, torch.Tensor]:
        """`step`: the training step (augmented when configured, seeded by seed, step and row); None in
        validation (never augmented)."""
        images = [decoded(data) for data in rows["image"]]
        if self.augment is not None and step is not None:
            images = [augmented(image, self.augment, np.random.default_rng([self.seed, step, int(row)]))
                      for image, row in zip(images, indices)]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.dtype)
        labels = torch.tensor([labels[:1] for labels in rows["labels"]], dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}


def augmented(image: Image.Image, cfg: ImageAugmentConfig, rng: np.random.Generator) -> Image.Image:
    if cfg.crop_scale is not None:
        image = random_resized_crop(image, cfg.crop_scale, rng)
    if cfg.horizontal_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def random_resized_crop(image: Image.Image, scale: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop on a PIL image (torchvision itself is not a dependency): a box of a
    random share of the area and a log-uniform aspect ratio, resized back to the image's size (the image
    processor then sizes it for the model). When no box fits in CROP_TRIES draws, the whole image."""
    width, height = image.size
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_TRIES):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return image
