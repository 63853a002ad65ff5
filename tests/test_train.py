"""Real runs of the tiny config: Ray Train workers, DeepSpeed engines on gloo, CPU."""

from __future__ import annotations

import json

import pytest

from conftest import BASELINE_STEPS as STEPS
from conftest import eval_losses, read_events, train_losses, train_tiny


@pytest.mark.parametrize("run", ["zero2_run", "zero3_run"])
def test_loss_decreases_and_run_folder_is_complete(run, request):
    run_dir = request.getfixturevalue(run)
    losses = train_losses(run_dir)
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    first_eval, last_eval = eval_losses(run_dir)
    assert last_eval < first_eval
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "samples.jsonl"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["eval_last"]["eval_loss"] == pytest.approx(last_eval)


def test_zero3_holds_a_partition_of_the_model_on_each_rank(zero3_run):
    setup = next(e for e in read_events(zero3_run) if e.get("event") == "setup")
    per_rank, total = setup["param_elements_per_rank"], setup["param_elements_total"]
    assert len(per_rank) == 2
    for local in per_rank:
        # Each rank's shard is half the model, give or take DeepSpeed's alignment padding.
        assert abs(local - total / 2) <= 0.01 * total, (local, total)


def test_zero2_and_zero3_follow_the_same_trajectory(zero2_run, zero3_run):
    assert train_losses(zero3_run) == pytest.approx(train_losses(zero2_run), rel=1e-4)


def test_one_worker_zero0_equals_two_workers_zero2_at_the_same_global_batch(zero2_run, tmp_path):
    one = train_tiny(tmp_path, f"train.max_steps={STEPS}", "deepspeed.stage=0", "ray.num_workers=1",
                     "train.grad_accum=2", "eval.generate=null")
    assert train_losses(one) == pytest.approx(train_losses(zero2_run), rel=1e-4)
    assert eval_losses(one)[-1] == pytest.approx(eval_losses(zero2_run)[-1], rel=1e-4)
