"""Generate the small vision data of the VLM, detection and segmentation tasks: configs/data/shapes/.

    python launch/make_shapes_data.py [--out DIR]

32x32 pictures of one to three coloured shapes (a square, a circle, a triangle; at most one of each,
never touching) on a dull background, each with its COCO boxes and its per-pixel class mask, and
questions about the shapes' colours and counts with one-word answers. Written in the shapes the tasks
read, train and held-out splits each:

- images/{train,eval}/NNNN.png, masks/{train,eval}/NNNN.png (one channel: 0 background, 1 square,
  2 circle, 3 triangle; the class ids of `CLASSES`);
- vlm_{train,eval}.jsonl: conversations with `<image>` placeholders and an `images` list (the
  LLaMA-Factory / ms-swift shape), some with two turns, some with two images;
  vlm_eval_parts.jsonl: the same held-out conversations as OpenAI-style content parts
  (`image_url` and `image` parts);
- detection_train.parquet (a `datasets` Image column with the PNG bytes, category ids) and
  detection_eval.jsonl (image paths, category names): `{image, objects: {bbox, category}}` rows, boxes
  as COCO's [x, y, width, height] in pixels;
- segmentation_{train,eval}.jsonl: `{image, mask}` rows.

Paths in the rows are relative to the data file. Deterministic (seeded): rerunning gives identical files.
"""

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "configs" / "data" / "shapes"
SIZE = 32
CLASSES = ("background", "square", "circle", "triangle")  # the mask values
SHAPES = CLASSES[1:]  # the detection categories (ids 0, 1, 2)
COLOURS = {"red": (215, 45, 40), "green": (45, 175, 60), "blue": (50, 80, 225), "yellow": (230, 205, 40)}
SHAPE_SIZE = (9, 15)  # pixels, inclusive range of a shape's width (= height)
NUM_TRAIN, NUM_EVAL = 320, 64  # images
TWO_IMAGE_EVERY = 8  # after every 8th picture, a question about it and the one before


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # COCO x, y, width, height of its drawn pixels


@dataclass(frozen=True)
class Picture:
    image: bytes  # PNG
    mask: bytes  # PNG, mode L
    shapes: tuple[Shape, ...]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def free_spot(size: int, taken: list[tuple[int, int, int]], rng: np.random.Generator) -> tuple[int, int] | None:
    """A top-left corner where a size x size box keeps a pixel of gap from every box taken."""
    for _ in range(50):
        x, y = (int(v) for v in rng.integers(0, SIZE - size + 1, size=2))
        if all(x + size + 1 <= tx or tx + ts + 1 <= x or y + size + 1 <= ty or ty + ts + 1 <= y
               for tx, ty, ts in taken):
            return x, y
    return None


def draw(canvas: ImageDraw.ImageDraw, kind: str, x: int, y: int, size: int, fill) -> None:
    right, bottom = x + size - 1, y + size - 1
    if kind == "square":
        canvas.rectangle((x, y, right, bottom), fill=fill)
    elif kind == "circle":
        canvas.ellipse((x, y, right, bottom), fill=fill)
    else:
        canvas.polygon([(x, bottom), (right, bottom), ((x + right) / 2, y)], fill=fill)


def picture(rng: np.random.Generator) -> Picture:
    ground = tuple(int(v) for v in rng.integers(70, 150, size=3))
    image, mask = Image.new("RGB", (SIZE, SIZE), ground), Image.new("L", (SIZE, SIZE), 0)
    kinds = [SHAPES[i] for i in sorted(rng.choice(3, size=int(rng.integers(1, 4)), replace=False))]
    taken, shapes = [], []
    for kind in kinds:
        size = int(rng.integers(SHAPE_SIZE[0], SHAPE_SIZE[1] + 1))
        spot = free_spot(size, taken, rng)
        if spot is None:
            continue
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
        draw(ImageDraw.Draw(image), kind, *spot, size, rgb)
        draw(ImageDraw.Draw(mask), kind, *spot, size, CLASSES.index(kind))
        taken.append((*spot, size))
        shapes.append(Shape(kind, colour, tight_box(np.asarray(mask) == CLASSES.index(kind))))
    return Picture(png(image), png(mask), tuple(shapes))


def tight_box(on: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(on)
    return int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


# ---------------------------------------------------------------- questions


def questions(pic: Picture, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every question this picture answers, in a seeded order."""
    present = {s.kind: s for s in pic.shapes}
    asked = [(f"What colour is the {kind}?", shape.colour) for kind, shape in present.items()]
    asked.append(("How many shapes are there?", str(len(pic.shapes))))
    asked += [(f"Is there a {kind}?", "yes" if kind in present else "no") for kind in SHAPES]
    return [asked[i] for i in rng.permutation(len(asked))]


def conversation(path: str, pic: Picture, turns: int, rng: np.random.Generator) -> dict:
    messages = []
    for i, (question, answer) in enumerate(questions(pic, rng)[:turns]):
        messages += [{"role": "user", "content": ("<image>" if i == 0 else "") + question},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages, "images": [path]}


def two_picture_conversation(paths: list[str], pics: list[Picture]) -> dict:
    total = sum(len(p.shapes) for p in pics)
    return {"messages": [{"role": "user", "content": "<image><image>How many shapes are there in the two pictures?"},
                         {"role": "assistant", "content": str(total)}], "images": paths}


def as_content_parts(row: dict, index: int) -> dict:
    """The same conversation with OpenAI-style content parts: each `<image>` becomes an image part
    (an `image_url` part, or every third row a transformers-style `image` part), in place."""
    images, messages = iter(row["images"]), []
    for turn in row["messages"]:
        if turn["role"] != "user":
            messages.append(turn)
            continue
        parts = []
        for k, text in enumerate(turn["content"].split("<image>")):
            if k:
                path = next(images)
                parts.append({"type": "image", "image": path} if index % 3 == 2
                             else {"type": "image_url", "image_url": {"url": path}})
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": parts})
    return {"messages": messages}


# ---------------------------------------------------------------- files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_pictures(out: Path, split: str, pics: list[Picture]) -> list[str]:
    for folder in ("images", "masks"):
        (out / folder / split).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pic in enumerate(pics):
        (out / "images" / split / f"{i:04d}.png").write_bytes(pic.image)
        (out / "masks" / split / f"{i:04d}.png").write_bytes(pic.mask)
        paths.append(f"images/{split}/{i:04d}.png")
    return paths


def objects(pic: Picture, by_name: bool) -> dict:
    return {"bbox": [list(s.box) for s in pic.shapes],
            "category": [s.kind if by_name else SHAPES.index(s.kind) for s in pic.shapes]}


def detection_parquet(path: Path, pics: list[Picture]) -> None:
    features = datasets.Features({
        "image": datasets.Image(),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                    "category": datasets.List(datasets.ClassLabel(names=list(SHAPES)))},
    })
    table = datasets.Dataset.from_dict({"image": [{"bytes": p.image, "path": None} for p in pics],
                                        "objects": [objects(p, by_name=False) for p in pics]}, features=features)
    table.to_parquet(str(path))


def vlm_rows(paths: list[str], pics: list[Picture], per_image: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for i, (path, pic) in enumerate(zip(paths, pics)):
        for k in range(per_image):
            rows.append(conversation(path, pic, turns=1 + (i + k) % 2 if per_image > 1 else 1, rng=rng))
        if i % TWO_IMAGE_EVERY == TWO_IMAGE_EVERY - 1:
            rows.append(two_picture_conversation([paths[i - 1], path], [pics[i - 1], pic]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    rng = np.random.default_rng(0)
    splits = {"train": [picture(rng) for _ in range(NUM_TRAIN)], "eval": [picture(rng) for _ in range(NUM_EVAL)]}
    for split, pics in splits.items():
        paths = write_pictures(out, split, pics)
        vlm = vlm_rows(paths, pics, per_image=2 if split == "train" else 1, rng=rng)
        write_jsonl(out / f"vlm_{split}.jsonl", vlm)
        if split == "eval":
            write_jsonl(out / "vlm_eval_parts.jsonl", [as_content_parts(r, i) for i, r in enumerate(vlm)])
            write_jsonl(out / "detection_eval.jsonl", [{"image": p, "objects": objects(pic, by_name=True)}
                                                       for p, pic in zip(paths, pics)])
        else:
            detection_parquet(out / "detection_train.parquet", pics)
        write_jsonl(out / f"segmentation_{split}.jsonl",
                    [{"image": p, "mask": p.replace("images/", "masks/", 1)} for p in paths])
    print(f"wrote {out}: {NUM_TRAIN} training and {NUM_EVAL} held-out pictures with boxes, masks and questions")


if __name__ == "__main__":
    main()
