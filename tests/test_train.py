"""Real runs of the tiny config: Ray Train workers, DeepSpeed engines on gloo, CPU."""

from __future__ import annotations

import glob
import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from sft_dist.data.batches import BatchPlan

from conftest import BASELINE_STEPS as STEPS
from conftest import REPO, eval_losses, read_events, train_losses, train_tiny


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


def test_grad_norm_and_loss_equal_a_plain_pytorch_step_on_the_same_global_batch(ray_cluster, tmp_path):
    """2 workers x grad_accum 2 x micro-batch 2: the first step's logged loss and gradient norm (DeepSpeed's,
    before clipping) equal plain PyTorch on the same 8 examples: the model's own loss, summed over the
    global batch's supervised tokens and divided by their count, one backward. A gradient scaled by the
    accumulation steps or the world size (which AdamW and clipping would hide from the losses) fails."""
    run = train_tiny(tmp_path, "train.max_steps=1", "train.micro_batch_size=2", "train.grad_accum=2",
                     "eval.at_start=false", "eval.at_end=false", "eval.generate=null")
    logged = next(e for e in read_events(run) if "loss" in e)
    (train_dir,) = glob.glob(str(tmp_path / ".cache" / "data" / "*" / "train"))
    rows = datasets.load_from_disk(train_dir)
    batch = BatchPlan(len(rows), 2, 2, 2, seed=42).global_batch(0)  # the config's seed: the workers' plan
    model = AutoModelForCausalLM.from_pretrained(REPO / "configs" / "models" / "tiny-llama").train()
    sums, counts = [], []
    for row in rows.select([int(i) for i in batch]):
        labels = torch.tensor([row["labels"]])
        counts.append(int((labels[:, 1:] != -100).sum()))
        sums.append(model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss * counts[-1])
    loss = torch.stack(sums).sum() / sum(counts)
    loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)).item()
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-4)
