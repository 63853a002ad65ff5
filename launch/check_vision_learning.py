"""Show that the tiny vision models learn the shapes data, in a plain PyTorch loop (no sft_dist training
machinery, no DeepSpeed, no Ray): the rows go through the vision encoders and batch makers, AdamW steps
on the model's own loss, and the held-out metric is printed from step 0.

    python launch/check_vision_learning.py vlm            # exact match of greedy answers, answer-token accuracy
    python launch/check_vision_learning.py detection      # COCO mAP and mAP@50 (pycocotools)
    python launch/check_vision_learning.py segmentation   # mean IoU and pixel accuracy
    [--steps N] [--lr LR] [--batch B] [--evals K]

One CPU thread; about a minute each on an idle core. Seeded: the same figures every run on one machine.
"""

import argparse
import json
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
    AutoProcessor,
)

from sft_dist.config import DataConfig
from sft_dist.data.batches import eval_batches
from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.data.detection import DetectionBatches, DetectionEncoder
from sft_dist.data.images import decoded, undecoded
from sft_dist.data.segmentation import SegmentationBatches, SegmentationEncoder
from sft_dist.data.vlm import VlmBatches, VlmEncoder
from sft_dist.tasks.vision_metrics import DetectionScores, SegmentationCounts

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "configs" / "data" / "shapes"
MODELS = REPO_ROOT / "configs" / "models"
SHAPES = ["square", "circle", "triangle"]
# Calibrated on this data: (lr, steps, batch) reaching a clear gain in about a minute of one core.
DEFAULTS = {"vlm": (3e-3, 600, 16), "detection": (1e-3, 800, 16), "segmentation": (3e-3, 1600, 16)}
EVAL_BATCH = 16


def encoded(encoder, name: str, folder: Path = DATA) -> dict[str, list]:
    """The encoder over a JSONL file (or a Parquet file's rows), bad rows refused."""
    if name.endswith(".parquet"):
        table = undecoded(datasets.Dataset.from_parquet(str(folder / name)), "image")
        rows = table.map(encoder, batched=True, with_indices=True, remove_columns=table.column_names,
                         features=encoder.features).to_dict()
    else:
        lines = (folder / name).read_text().splitlines()
        rows = encoder({"_json": lines, "_line": list(range(1, len(lines) + 1)), "_error": [None] * len(lines)},
                       list(range(len(lines))))
    assert set(rows["reason"]) == {None}, sorted({d for d in rows["detail"] if d})
    return rows


def pick(rows: dict[str, list], indices, keys) -> dict[str, list]:
    return {k: [rows[k][int(i)] for i in indices] for k in keys}


# ---------------------------------------------------------------- tasks


class VlmTask:
    keys = ("input_ids", "labels", "images")
    max_grad_norm = None

    def __init__(self):
        self.processor = AutoProcessor.from_pretrained(MODELS / "tiny-vlm")
        self.model = AutoModelForImageTextToText.from_pretrained(MODELS / "tiny-vlm")
        self.encoder = VlmEncoder(DataConfig(train=["unused.jsonl"]), self.processor, folder=DATA)
        self.train, self.eval = encoded(self.encoder, "vlm_train.jsonl"), encoded(self.encoder, "vlm_eval.jsonl")
        self.prompts = [self.encoder.conversation(json.loads(line))
                        for line in (DATA / "vlm_eval.jsonl").read_text().splitlines()]
        self.batches = VlmBatches(self.processor, self.processor.tokenizer.pad_token_id)

    def loss(self, batch):
        return self.model(**batch).loss

    def evaluate(self) -> dict[str, float]:
        hits = total = 0
        for indices in eval_batches(len(self.eval["input_ids"]), EVAL_BATCH, 0, 1):
            batch = self.batches(pick(self.eval, indices, self.keys))
            logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            supervised = labels != IGNORE_INDEX
            hits += ((logits.argmax(-1) == labels) & supervised).sum().item()
            total += supervised.sum().item()
        exact = [self._answer(messages, images) == messages[-1]["content"][0]["text"]
                 for messages, images in self.prompts]
        return {"exact_match": sum(exact) / len(exact), "answer_token_acc": hits / total}

    def _answer(self, messages: list[dict], images: list[bytes]) -> str:
        text = self.processor.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[decoded(b) for b in images], return_tensors="pt")
        out = self.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        return self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class DetectionTask:
    keys = ("image", "boxes", "categories")
    max_grad_norm = 1.0  # as DETR trains (its recipe clips at 0.1); unclipped, its box losses spike

    def __init__(self):
        self.processor = AutoImageProcessor.from_pretrained(MODELS / "tiny-detector", backend="pil")
        self.model = AutoModelForObjectDetection.from_pretrained(MODELS / "tiny-detector")
        encoder = DetectionEncoder(DataConfig(train=["unused.jsonl"]), SHAPES, DATA)
        self.train, self.eval = encoded(encoder, "detection_train.parquet"), encoded(encoder, "detection_eval.jsonl")
        self.batches, self.scores = DetectionBatches(self.processor), DetectionScores(self.processor, SHAPES)

    def loss(self, batch):
        return self.model(**batch).loss

    def evaluate(self) -> dict[str, float]:
        records = []
        for indices in eval_batches(len(self.eval["image"]), EVAL_BATCH, 0, 1):
            rows = pick(self.eval, indices, self.keys)
            batch = self.batches(rows, indices)
            outputs = self.model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
            records += self.scores.records(outputs, batch, rows, [int(i) for i in indices])
        metrics = self.scores.metrics(records)
        return {"map": metrics["eval_map"], "map_50": metrics["eval_map_50"]}


class SegmentationTask:
    keys = ("image", "mask")
    max_grad_norm = None

    def __init__(self):
        self.processor = AutoImageProcessor.from_pretrained(MODELS / "tiny-segformer", backend="pil")
        self.model = AutoModelForSemanticSegmentation.from_pretrained(MODELS / "tiny-segformer")
        encoder = SegmentationEncoder(DataConfig(train=["unused.jsonl"]), ["background", *SHAPES], DATA)
        self.train = encoded(encoder, "segmentation_train.jsonl")
        self.eval = encoded(encoder, "segmentation_eval.jsonl")
        self.batches, self.counter = SegmentationBatches(self.processor), SegmentationCounts(1 + len(SHAPES))

    def loss(self, batch):
        return self.model(**batch).loss

    def evaluate(self) -> dict[str, float]:
        totals = torch.zeros(self.counter.size, dtype=torch.float64)
        for indices in eval_batches(len(self.eval["image"]), EVAL_BATCH, 0, 1):
            batch = self.batches(pick(self.eval, indices, self.keys))
            totals += self.counter.counts(self.model(pixel_values=batch["pixel_values"]).logits, batch["labels"])
        metrics = self.counter.metrics(totals.tolist())
        return {"mean_iou": metrics["eval_mean_iou"], "pixel_accuracy": metrics["eval_pixel_accuracy"]}


TASKS = {"vlm": VlmTask, "detection": DetectionTask, "segmentation": SegmentationTask}


def evaluated(task) -> dict[str, float]:
    task.model.eval()
    with torch.no_grad():
        metrics = task.evaluate()
    task.model.train()
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--evals", type=int, default=4, help="validations after step 0")
    args = parser.parse_args()
    given = (args.lr, args.steps, args.batch)
    lr, steps, batch_size = (a if a is not None else d for a, d in zip(given, DEFAULTS[args.task]))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = TASKS[args.task]()
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=lr)
    rng, started, num_rows = np.random.default_rng(0), time.time(), len(task.train[task.keys[0]])
    print(f"{args.task}: lr {lr:g}, {steps} steps of {batch_size}, {num_rows} training rows")
    print(f"step 0: {fmt(evaluated(task))}", flush=True)
    for step in range(1, steps + 1):
        indices = rng.choice(num_rows, batch_size, replace=False)
        loss = task.loss(task.batches(pick(task.train, indices, task.keys), indices, step))
        loss.backward()
        if task.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(task.model.parameters(), task.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        if step % max(steps // args.evals, 1) == 0 or step == steps:
            print(f"step {step}: loss {loss.item():.3f} {fmt(evaluated(task))} ({time.time() - started:.0f} s)",
                  flush=True)


def fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in metrics.items())


if __name__ == "__main__":
    main()
