"""Generate the small image-classification data of configs/image-tiny.yaml: configs/data/colours/.

    python launch/make_image_data.py [--out DIR]

Three classes of 32x32 striped images, named by the colour of their stripes (red, green, blue), the
stripes' direction, width and phase and the other colour random: easy to see, not a constant image per
class. Written in both shapes the `image_classification` format reads: the training rows as a Parquet
file with a `datasets` Image column (the PNG bytes in the table), the validation rows as JSONL naming
PNG files relative to it. Deterministic (seeded): rerunning gives identical files.
"""

import argparse
import io
import json
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "configs" / "data" / "colours"
CLASSES = ("red", "green", "blue")
SIZE = 32
TRAIN_PER_CLASS, EVAL_PER_CLASS = 40, 16


def striped(label: int, rng: np.random.Generator) -> Image.Image:
    """Stripes of the class's colour (its channel strong, the others weak) over a random dull colour."""
    stripe = rng.integers(20, 110, size=3)
    stripe[label] = rng.integers(170, 256)
    ground = rng.integers(40, 140, size=3)
    width, phase = int(rng.integers(2, 6)), int(rng.integers(0, 8))
    y, x = np.mgrid[:SIZE, :SIZE]
    along = [x, y, x + y, x - y][rng.integers(0, 4)]  # vertical, horizontal or diagonal stripes
    on = ((along + phase) // width) % 2 == 0
    pixels = np.where(on[..., None], stripe, ground).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def examples(per_class: int, rng: np.random.Generator) -> list[tuple[bytes, str]]:
    rows = [(png(striped(label, rng)), name) for label, name in enumerate(CLASSES) for _ in range(per_class)]
    return [rows[i] for i in rng.permutation(len(rows))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    rng = np.random.default_rng(0)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    train = examples(TRAIN_PER_CLASS, rng)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in train],
                                        "label": [name for _, name in train]}, features=features)
    table.to_parquet(str(out / "train.parquet"))
    lines = []
    for i, (data, name) in enumerate(examples(EVAL_PER_CLASS, rng)):
        (out / "eval" / f"{i:03d}.png").write_bytes(data)
        lines.append(json.dumps({"image": f"eval/{i:03d}.png", "label": name}))
    (out / "eval.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}: {len(train)} training images (Parquet), {len(lines)} validation images (PNG files)")


if __name__ == "__main__":
    main()
