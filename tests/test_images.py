"""Image classification: a tiny ViT (configs/models/tiny-vit) gets a new head and learns the colour-stripe
images of configs/image-tiny.yaml with DeepSpeed; augmentation, bad images, metrics against a
single-process computation on the export, and the export in `pipeline("image-classification")`. The runs
are in process (--no-ray, accumulation keeping the config's global batch): the task is the subject here,
and its counts add up over ranks as the sentiment run on 2 Ray workers shows (tests/test_tasks.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_tasks import reference_macro_f1

from sft_dist import config as config_lib
from sft_dist.data.images import ImageBatches
from sft_dist.data.labels import with_labels
from sft_dist.driver import commands
from sft_dist.errors import UserError
from sft_dist.modeling import model

from conftest import REPO, read_events

IMAGE_CONFIG = REPO / "configs" / "image-tiny.yaml"
DATA = REPO / "configs" / "data" / "colours"


def load(*overrides: str):
    return with_labels(config_lib.load(IMAGE_CONFIG, list(overrides)))


def eval_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / "eval.jsonl").read_text().splitlines()]


def evals(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if "eval_loss" in e]


# ---------------------------------------------------------------- data (no Ray)


def test_labels_come_from_the_parquet_image_column_rows():
    assert load().model.labels == ["blue", "green", "red"]


def test_augmentation_is_seeded_per_step_and_row_and_off_in_validation():
    cfg = load()
    processor = model.load_image_processor(cfg.model)
    batches = ImageBatches(processor, cfg.data.image_augment, cfg.seed)
    rows = {"image": [(DATA / r["image"]).read_bytes() for r in eval_rows()[:4]], "labels": [[0], [1], [2], [0]]}
    rows_at = [5, 6, 7, 8]
    plain = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in rows["image"]],
                      return_tensors="pt")["pixel_values"]
    assert torch.equal(batches(rows)["pixel_values"], plain)  # validation: the processor's pixels, as is
    step3 = batches(rows, rows_at, 3)["pixel_values"]
    assert torch.equal(step3, batches(rows, rows_at, 3)["pixel_values"])  # a rerun draws the same
    for other in (batches(rows, rows_at, 4), batches(rows, [9, 6, 7, 8], 3), ImageBatches(
            processor, cfg.data.image_augment, cfg.seed + 1)(rows, rows_at, 3)):
        assert not torch.equal(other["pixel_values"][0], step3[0])
    assert not torch.equal(step3, plain) and step3.shape == plain.shape
    assert batches(rows)["labels"].tolist() == [[0], [1], [2], [0]]


def truncated_png_parquet(tmp_path: Path) -> Path:
    """The shipped training Parquet with row 3's image cut short (the PNG header intact)."""
    table = datasets.Dataset.from_parquet(str(DATA / "train.parquet"))
    table = table.cast_column("image", datasets.Image(decode=False))
    images = list(table["image"])
    images[3] = {"bytes": images[3]["bytes"][:60], "path": None}
    broken = table.remove_columns("image").add_column("image", images).cast_column("image", datasets.Image())
    path = tmp_path / "train.parquet"
    broken.to_parquet(str(path))
    return path


def test_bad_images_name_file_and_row_and_skip_counts_them(tmp_path):
    missing = tmp_path / "eval.jsonl"
    rows = [{"image": str(DATA / r["image"]), "label": r["label"]} for r in eval_rows()[:6]]
    rows[4]["image"] = "no-such.png"  # relative: looked for next to eval.jsonl
    missing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    broken = truncated_png_parquet(tmp_path)
    cases = (("eval", missing, (str(missing), 5, "missing_image"), str(tmp_path / "no-such.png")),
             ("train", broken, (str(broken), None, "unreadable_image"), "row 3:"))
    for split, path, where, words in cases:
        cfg = load(f"data.{split}={path}", f"output_dir={tmp_path}")
        with pytest.raises(UserError) as err:
            commands.prepare_data(cfg)
        assert (err.value.file, err.value.line) == where[:2] and where[2] in str(err.value), str(err.value)
        assert words in str(err.value), str(err.value)
        skipped = commands.prepare_data(load(f"data.{split}={path}", f"output_dir={tmp_path}", "data.on_bad_row=skip"))
        assert skipped.stats[split]["rows_skipped"] == 1 and skipped.stats[split]["dropped"] == {where[2]: 1}


def test_a_missing_image_exits_2_from_the_cli_naming_file_and_line(tmp_path, capsys):
    from sft_dist.cli import main

    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"image": "eval/000.png", "label": "red"}) + "\n")  # not next to this file
    assert main(["data", str(IMAGE_CONFIG), "--set", f"data.eval={bad}", "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: missing_image: 'image': cannot read {tmp_path / 'eval/000.png'}" in err, err


# ---------------------------------------------------------------- real runs on 2 workers


def train(output_dir: Path, *overrides: str, extra_args: tuple[str, ...] = ()) -> Path:
    from sft_dist.cli import main

    code = main(["train", str(IMAGE_CONFIG), "--set", f"output_dir={output_dir}", "--set", "run_name=run",
                 *[arg for o in overrides for arg in ("--set", o)], *extra_args])
    assert code == 0, f"training exited {code}"
    return output_dir / "run"


@pytest.fixture(scope="session")
def image_run(tmp_path_factory) -> Path:
    """The shipped config, shortened: ZeRO-2, augmented, exported at the end."""
    return train(tmp_path_factory.mktemp("images"), "train.max_steps=12", "eval.every_steps=null",
                 "checkpoint.every_steps=12", "checkpoint.export_at_end=true", "train.grad_accum=2",
                 extra_args=("--no-ray",))


def exported_logits(folder: Path, paths: list[Path]) -> torch.Tensor:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    classifier = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        return classifier(**processor(images=images, return_tensors="pt")).logits


def test_image_accuracy_improves_on_held_out_images(image_run):
    first, last = evals(image_run)
    assert first["step"] == 0 and last["step"] == 12
    assert last["eval_accuracy"] >= first["eval_accuracy"] + 0.4, (first, last)
    assert last["eval_loss"] < first["eval_loss"]


def test_image_metrics_equal_a_single_process_computation_on_the_export(image_run):
    from transformers import AutoConfig

    folder = image_run / "model"
    config = AutoConfig.from_pretrained(folder)
    assert config.id2label == {0: "blue", 1: "green", 2: "red"}
    assert config.architectures == ["ViTForImageClassification"]
    rows = eval_rows()
    logits = exported_logits(folder, [DATA / r["image"] for r in rows])
    target = np.array([config.label2id[r["label"]] for r in rows])
    predicted = logits.argmax(-1).numpy()
    last = evals(image_run)[-1]
    assert last["eval_examples"] == len(rows)
    assert last["eval_accuracy"] == pytest.approx((predicted == target).mean())
    assert last["eval_macro_f1"] == pytest.approx(reference_macro_f1(target, predicted))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target)).item()
    assert last["eval_loss"] == pytest.approx(loss, rel=1e-4)


def test_exported_image_model_works_in_a_pipeline(image_run):
    from transformers import pipeline

    folder = image_run / "model"
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    paths = [DATA / r["image"] for r in eval_rows()[:8]]
    answers = classify([str(p) for p in paths], top_k=1)
    names = json.loads((folder / "config.json").read_text())["id2label"]
    expected = [names[str(i)] for i in exported_logits(folder, paths).argmax(-1).tolist()]
    assert [a[0]["label"] for a in answers] == expected


def test_lora_under_zero1_trains_and_saves_the_image_head(tmp_path):
    """LoRA on the tiny ViT under ZeRO-1: the new head is in modules_to_save, trained and saved; the merged
    export's accuracy is the one logged."""
    from transformers import AutoModelForImageClassification

    from sft_dist.cli import main

    run_dir = train(tmp_path, "peft.method=lora", "deepspeed.stage=1", "train.grad_accum=2",
                    "train.max_steps=6", "train.lr=1e-2", "eval.every_steps=null", "checkpoint.every_steps=6",
                    extra_args=("--no-ray",))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["classifier"]
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()
    # The logged validation is reproduced by the merged model: its head is the trained one, not a fresh one.
    merged = AutoModelForImageClassification.from_pretrained(tmp_path / "merged")
    rows = eval_rows()
    logits = exported_logits(tmp_path / "merged", [DATA / r["image"] for r in rows])
    target = torch.tensor([merged.config.label2id[r["label"]] for r in rows])
    first, last = evals(run_dir)
    assert last["eval_accuracy"] == pytest.approx((logits.argmax(-1) == target).double().mean().item())
    assert last["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-4)
    assert last["eval_loss"] < first["eval_loss"], (first, last)


def test_eval_command_on_the_image_run_repeats_its_last_validation(image_run, tmp_path, capsys):
    from sft_dist.cli import main

    assert main(["eval", str(IMAGE_CONFIG), "--checkpoint", str(image_run), "--set", f"output_dir={tmp_path}",
                 "--set", "run_name=again", "--no-ray"]) == 0
    result = json.loads((tmp_path / "eval-again" / "eval.json").read_text())
    last = evals(image_run)[-1]
    assert result["step"] == 12 and result["eval_examples"] == last["eval_examples"] == 48
    assert result["eval_accuracy"] == last["eval_accuracy"] and result["eval_macro_f1"] == last["eval_macro_f1"]
    assert result["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
