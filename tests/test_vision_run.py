"""The vision tasks end to end on 2 Ray workers: semantic segmentation (ZeRO-2), object detection (ZeRO-2)
and vision-language chat SFT (LoRA on the language model, vision tower frozen, ZeRO-3), each validated at
step 0 and at its end, exported, and checked against what other code computes on the export: torchmetrics
(mean IoU, pixel accuracy), pycocotools on the export's own post-processed boxes, the model's own
loss, and each task's transformers pipeline. Also `sft-dist data` on the VLM config (what is supervised) and one bad
detection row through the CLI. One short run per task serves all of its asserts."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, read_events

DATA = REPO / "configs" / "data" / "shapes"
CONFIGS = {name: REPO / "configs" / f"{name}-tiny.yaml" for name in ("segmentation", "detection", "vlm")}
STEPS = {"segmentation": 40, "detection": 100, "vlm": 30}


def train(name: str, output_dir: Path, *overrides: str) -> Path:
    from sft_dist.cli import main

    steps = STEPS[name]
    fixed = [f"output_dir={output_dir}", "run_name=run", f"train.max_steps={steps}", "eval.every_steps=null",
             f"checkpoint.every_steps={steps}", "checkpoint.export_at_end=true", *overrides]
    assert main(["train", str(CONFIGS[name]), *[a for o in fixed for a in ("--set", o)]]) == 0
    return output_dir / "run"


def evals(run_dir: Path, metric: str) -> list[dict]:
    return [e for e in read_events(run_dir) if metric in e]


def eval_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def segmentation_run(ray_cluster, tmp_path_factory) -> Path:
    return train("segmentation", tmp_path_factory.mktemp("segmentation"))


@pytest.fixture(scope="module")
def detection_run(ray_cluster, tmp_path_factory) -> Path:
    """A constant, higher rate than the config's: mAP is slow to start, and this run is short."""
    return train("detection", tmp_path_factory.mktemp("detection"), "train.lr=3e-3", "train.scheduler=constant")


@pytest.fixture(scope="module")
def vlm_run(ray_cluster, tmp_path_factory) -> Path:
    """LoRA on the language model only (Llama's o/gate/up/down projections; CLIP's vision tower names its
    own out_proj, fc1, fc2), the vision tower frozen, under ZeRO-3."""
    return train("vlm", tmp_path_factory.mktemp("vlm"), "deepspeed.stage=3", "peft.method=lora",
                 "peft.target_modules=[o_proj, gate_proj, up_proj, down_proj]", "peft.r=16",
                 "peft.alpha=32", "train.lr=1e-2", "model.freeze_vision=true")


@pytest.fixture(scope="module")
def vlm_merged(vlm_run, tmp_path_factory) -> Path:
    """The LoRA run's checkpoint merged into its base: a plain model folder."""
    from sft_dist.cli import main

    merged = tmp_path_factory.mktemp("vlm-merged") / "model"
    assert main(["export", str(vlm_run), "--out", str(merged), "--merge-lora"]) == 0
    return merged


# ---------------------------------------------------------------- semantic segmentation


@pytest.mark.timeout(300)
def test_segmentation_mean_iou_rises_and_equals_torchmetrics_on_the_export(segmentation_run):
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    first, last = evals(segmentation_run, "eval_mean_iou")
    assert first["step"] == 0 and last["step"] == STEPS["segmentation"]
    assert last["eval_mean_iou"] > first["eval_mean_iou"] + 0.1, (first, last)
    folder = segmentation_run / "model"
    model = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    rows = eval_rows("segmentation_eval.jsonl")
    images = [Image.open(DATA / r["image"]).convert("RGB") for r in rows]
    masks = torch.tensor(np.stack([np.asarray(Image.open(DATA / r["mask"])) for r in rows])).long()
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    predicted = torch.nn.functional.interpolate(logits, size=masks.shape[-2:], mode="bilinear").argmax(1)
    classes = len(model.config.id2label)
    iou = MulticlassJaccardIndex(classes, average="macro", ignore_index=255)(predicted, masks).item()
    accuracy = MulticlassAccuracy(classes, average="micro", ignore_index=255)(predicted, masks).item()
    assert last["eval_pixels"] == masks.numel()
    assert last["eval_mean_iou"] == pytest.approx(iou, abs=1e-5)
    assert last["eval_pixel_accuracy"] == pytest.approx(accuracy, abs=1e-5)


def test_exported_segmenter_answers_in_its_pipeline(segmentation_run):
    from transformers import pipeline

    segment = pipeline("image-segmentation", model=str(segmentation_run / "model"), device="cpu")
    found = segment(str(DATA / eval_rows("segmentation_eval.jsonl")[0]["image"]))
    assert found and {f["label"] for f in found} <= {"background", "square", "circle", "triangle"}
    assert all(f["mask"].size == (32, 32) for f in found)


# ---------------------------------------------------------------- object detection


def coco_map(found: list[dict], rows: list[dict], names: dict[str, int]) -> tuple[float, float]:
    """COCOeval's mAP and mAP@50 of post-processed predictions (xyxy) against the rows' own COCO boxes."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO()
    annotations = [{"image_id": i, "category_id": names[c], "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
                   for i, r in enumerate(rows) for box, c in zip(r["objects"]["bbox"], r["objects"]["category"])]
    for number, annotation in enumerate(annotations, start=1):  # COCOeval reads id 0 as "no match"
        annotation["id"] = number
    truth.dataset = {"images": [{"id": i, "height": 32, "width": 32} for i in range(len(rows))],
                     "annotations": annotations, "categories": [{"id": i} for i in names.values()]}
    detections = [{"image_id": i, "category_id": int(c), "score": float(s), "bbox": [x0, y0, x1 - x0, y1 - y0]}
                  for i, f in enumerate(found) for (x0, y0, x1, y1), s, c in
                  zip(f["boxes"].tolist(), f["scores"].tolist(), f["labels"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        scoring = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        scoring.evaluate()
        scoring.accumulate()
        scoring.summarize()
    return float(scoring.stats[0]), float(scoring.stats[1])


@pytest.mark.timeout(300)
def test_detection_map_rises_and_equals_pycocotools_on_the_export(detection_run):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    first, last = evals(detection_run, "eval_map")
    assert first["step"] == 0 and last["step"] == STEPS["detection"]
    # Small in 100 steps (DETR's matching is slow to start) but well clear of the untrained model's.
    assert last["eval_map_50"] > 10 * first["eval_map_50"] and last["eval_map"] > 5 * first["eval_map"], (first, last)
    folder = detection_run / "model"
    model = AutoModelForObjectDetection.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    rows = eval_rows("detection_eval.jsonl")
    images = [Image.open(DATA / r["image"]).convert("RGB") for r in rows]
    with torch.no_grad():
        outputs = model(**processor(images=images, return_tensors="pt"))
    found = processor.post_process_object_detection(outputs, threshold=0.0,
                                                     target_sizes=[(im.height, im.width) for im in images])
    reference = coco_map(found, rows, {v: int(k) for k, v in model.config.id2label.items()})
    assert last["eval_images"] == len(rows)
    assert (last["eval_map"], last["eval_map_50"]) == pytest.approx(reference, abs=1e-5)


def test_exported_detector_answers_in_its_pipeline(detection_run):
    from transformers import pipeline

    detect = pipeline("object-detection", model=str(detection_run / "model"), device="cpu")
    found = detect(str(DATA / eval_rows("detection_eval.jsonl")[0]["image"]), threshold=0.0)
    assert found and {f["label"] for f in found} <= {"square", "circle", "triangle"}
    assert all(f["box"]["xmin"] <= f["box"]["xmax"] and f["box"]["ymin"] <= f["box"]["ymax"] for f in found)


def test_a_box_outside_its_image_exits_2_naming_file_and_line(tmp_path, capsys):
    from sft_dist.cli import main

    rows = eval_rows("detection_eval.jsonl")[:2]
    for row in rows:
        row["image"] = str(DATA / row["image"])
    rows[1]["objects"]["bbox"][0] = [20, 20, 30, 5]  # reaches x=50 in a 32-pixel image
    bad = tmp_path / "eval.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", str(CONFIGS["detection"]), "--set", f"data.eval={bad}",
                 "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: box_outside_image" in err and "outside the 32x32 image" in err, err


# ---------------------------------------------------------------- vision-language chat


def test_sft_dist_data_shows_only_the_answers_supervised(tmp_path, capsys):
    from sft_dist.cli import main

    assert main(["data", str(CONFIGS["vlm"]), "--set", f"output_dir={tmp_path}"]) == 0
    shown = capsys.readouterr().out
    example = shown.split("supervised tokens between [[ and ]]):", 1)[1]
    user, answer = example.split("<|im_start|>assistant", 1)
    assert "<image>" * 16 + "Is there a circle?" in user and "[[" not in user  # image tokens, user turn: unsupervised
    assert "[[no<|im_end|>]]" in answer


def prepared_eval(run_dir: Path) -> datasets.Dataset:
    (folder,) = (run_dir.parent / ".cache" / "data").glob("*/eval")
    return datasets.load_from_disk(str(folder))


@pytest.mark.timeout(300)
def test_vlm_lora_under_zero3_keeps_its_trained_parts_in_the_merged_export(vlm_run, vlm_merged):
    """The merged export reproduces the logged validation with the model's own loss; the vision tower is
    the base model's (frozen); the adapters changed the language model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sft_dist.data.vlm import VlmBatches

    first, last = evals(vlm_run, "eval_token_acc")
    assert first["step"] == 0 and last["step"] == STEPS["vlm"]
    assert last["eval_token_acc"] > first["eval_token_acc"] + 0.2 and last["eval_loss"] < first["eval_loss"]
    merged = vlm_merged
    assert (vlm_run / "model" / "adapter_config.json").is_file()  # export_at_end: the adapter folder
    model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    base = AutoModelForImageTextToText.from_pretrained(REPO / "configs" / "models" / "tiny-vlm").eval()
    processor = AutoProcessor.from_pretrained(merged, backend="pil")
    rows = prepared_eval(vlm_run)
    make = VlmBatches(processor, processor.tokenizer.pad_token_id)
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            part = rows[start : start + 16]
            for i in range(len(part["input_ids"])):  # one row at a time: the model's own mean is per row
                batch = make({k: [part[k][i]] for k in ("input_ids", "labels", "images")})
                count = part["num_supervised"][i]
                loss_sum += model(**batch).loss.item() * count
                tokens += count
    assert last["eval_tokens"] == tokens
    assert last["eval_loss"] == pytest.approx(loss_sum / tokens, rel=1e-4)
    tower, base_tower = model.model.vision_tower.state_dict(), base.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], base_tower[k]) for k in base_tower)
    language, base_language = model.model.language_model.state_dict(), base.model.language_model.state_dict()
    assert any(not torch.equal(language[k], base_language[k]) for k in base_language)


def test_vlm_export_answers_in_its_pipeline(vlm_merged):
    """The merged export loads offline in pipeline("image-text-to-text") and answers."""
    from transformers import pipeline

    folder = vlm_merged
    chat = pipeline("image-text-to-text", model=str(folder), device="cpu")
    image = str(DATA / "images" / "eval" / "0000.png")
    messages = [{"role": "user", "content": [{"type": "image", "url": image},
                                             {"type": "text", "text": "How many shapes are there?"}]}]
    answer = chat(text=messages, max_new_tokens=4, do_sample=False, return_full_text=False)
    assert isinstance(answer[0]["generated_text"], str) and answer[0]["generated_text"].strip()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["detection", "segmentation"])
def test_zero3_resumed_run_continues_the_uninterrupted_one(name, tmp_path):
    """Under ZeRO-3 (the detector built whole, DETR's __init__ copies its backbone's batch norms; the
    segmenter partitioned), a run resumed from its step-3 checkpoint trains steps 4-6 with the
    uninterrupted run's losses: weights, optimizer, schedule and the seeded augmentation come back.
    One process (--no-ray): the checkpoint is the subject."""
    from sft_dist import checkpoints
    from sft_dist.cli import main

    def run(run_name: str, *extra: str) -> dict[int, float]:
        fixed = [f"output_dir={tmp_path}", f"run_name={run_name}", "train.max_steps=6", "checkpoint.every_steps=3",
                 "logging.every_steps=1", "eval.every_steps=null", "eval.at_start=false", "eval.at_end=false",
                 "deepspeed.stage=3"]
        assert main(["train", str(CONFIGS[name]), "--no-ray", *[a for o in fixed for a in ("--set", o)], *extra]) == 0
        return {e["step"]: e["loss"] for e in read_events(tmp_path / run_name) if "loss" in e}

    whole = run("whole")
    again = run("again", "--resume", str(tmp_path / "whole" / checkpoints.folder_name(3)))
    assert sorted(again) == [4, 5, 6]
    assert [again[s] for s in (4, 5, 6)] == pytest.approx([whole[s] for s in (4, 5, 6)], rel=1e-6)
