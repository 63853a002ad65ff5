"""A task is data: `sft_dist.tasks.regression` (a one-output head on text, squared error, MSE/MAE) is
only its own module and its line in `TASK_MODULES`, and it trains on 2 Ray workers through the same
driver, loop, validation and export as every other task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_dist import config as config_lib
from sft_dist.tasks import TASKS, task_of

from conftest import REPO, read_events

SENTIMENT = REPO / "configs" / "data" / "sentiment"
MINILM = REPO / ".cache" / "models" / "all-MiniLM-L6-v2"
STARS = {"positive": 4.0, "negative": 1.0}


def rated(source: Path, out: Path, count: int) -> Path:
    """Sentiment reviews as star ratings: a number per row (with a little spread so the target is not two
    points), the review as the text."""
    rows = [json.loads(line) for line in source.read_text().splitlines()[:count]]
    out.write_text("".join(json.dumps({"text": r["text"], "value": STARS[r["label"]] + (i % 3) * 0.25}) + "\n"
                           for i, r in enumerate(rows)))
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "launch"))
    from prepare_minilm import prepare
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert-regression")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(prepare(MINILM)).save_pretrained(folder)
    return folder


def overrides(tiny_bert: Path, tmp_path: Path) -> list[str]:
    return [f"model.name_or_path={tiny_bert}", "model.task=regression", "data.format=regression",
            f"data.train={rated(SENTIMENT / 'train.jsonl', tmp_path / 'train.jsonl', 96)}",
            f"data.eval={rated(SENTIMENT / 'eval.jsonl', tmp_path / 'eval.jsonl', 21)}",  # odd: uneven rank shards
            "eval.metric=eval_mse", f"output_dir={tmp_path}", "run_name=run", "train.lr=1.0e-3",
            "train.max_steps=6", "eval.every_steps=null", "checkpoint.every_steps=6", "checkpoint.export_at_end=true"]


def test_the_registry_describes_the_regression_task_and_config_reads_it():
    task = TASKS["regression"]
    assert task.formats == {"regression": ("text", "text_pair", "value")} and not task.labelled
    assert config_lib.FORMAT_FIELDS["regression"] == ("text", "text_pair", "value")
    assert {"eval_mse", "eval_mae"} <= set(config_lib.EVAL_METRICS)
    cfg = config_lib.RunConfig.model_validate({"model": {"name_or_path": "m", "task": "regression"},
                                               "data": {"train": "t.jsonl", "format": "regression"},
                                               "eval": {"metric": "eval_mae"}})
    assert task_of(cfg) is task and cfg.eval.direction() == "min"
    with pytest.raises(ValueError, match="model.task regression trains on data.format: regression, not text"):
        config_lib.RunConfig.model_validate({"model": {"name_or_path": "m", "task": "regression"},
                                             "data": {"train": "t.jsonl", "format": "text"}})
    with pytest.raises(ValueError, match="regression data needs model.task: regression"):
        config_lib.RunConfig.model_validate({"model": {"name_or_path": "m"},
                                             "data": {"train": "t.jsonl", "format": "regression"}})


def test_regression_on_2_workers_reports_the_mse_of_its_export(ray_cluster, tiny_bert, tmp_path):
    """The run's all-reduced eval_mse / eval_mae over 21 rows split unevenly on 2 ranks equal numpy's on the
    exported model's own forward; its eval_loss is transformers' own regression loss (MSELoss)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sft_dist.cli import main

    config = REPO / "configs" / "sentiment-minilm.yaml"
    assert main(["train", str(config), *[a for o in overrides(tiny_bert, tmp_path) for a in ("--set", o)]]) == 0
    run = tmp_path / "run"
    first, last = [e for e in read_events(run) if "eval_mse" in e]
    folder = run / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert (model.config.problem_type, model.config.num_labels) == ("regression", 1)
    assert model.config.architectures == ["BertForSequenceClassification"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    values = torch.tensor([r["value"] for r in rows])
    with torch.no_grad():
        out = model(**tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt"), labels=values)
    error = out.logits.squeeze(-1).numpy().astype(np.float64) - values.numpy()
    assert last["eval_examples"] == len(rows) == 21
    assert last["eval_mse"] == pytest.approx(np.mean(error**2), rel=1e-4)
    assert last["eval_mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-4)
    assert last["eval_loss"] == pytest.approx(out.loss.item(), rel=1e-4)
    assert last["eval_mse"] < first["eval_mse"]  # it learned something: the head's mean moved toward the stars
