"""Real runs of the tiny config: Ray Train workers, DeepSpeed engines on gloo, CPU."""

from __future__ import annotations

import contextlib
import glob
import io
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


def test_grad_norm_and_loss_equal_a_plain_pytorch_step_on_the_same_global_batch(stopped_ray_run):
    """2 workers x grad_accum 2 x micro-batch 2: the first step's logged loss and gradient norm (DeepSpeed's,
    before clipping) equal plain PyTorch on the same 8 examples: the model's own loss, summed over the
    global batch's supervised tokens and divided by their count, one backward. A gradient scaled by the
    accumulation steps or the world size (which AdamW and clipping would hide from the losses) fails.
    (The first step's loss and gradient come before any learning rate acts: the run's schedule is moot.)"""
    run = stopped_ray_run.run_dir
    logged = next(e for e in read_events(run) if "loss" in e)
    assert logged["step"] == 1
    (train_dir,) = glob.glob(str(run.parent / ".cache" / "data" / "*" / "train"))
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


# The first run in an environment compiles DeepSpeed's cpu_adam op: 135 CPU-seconds, 218 s measured on 2 busy cores.
@pytest.mark.timeout(600)
def test_zero3_with_optimizer_and_parameter_offload_follows_zero3(tmp_path):
    """Offloaded, DeepSpeed steps the optimizer with its CPU Adam (the cpu_adam op, built once per
    environment) on the partitions' fp32 master copies held in host memory; the losses and gradient norms
    are those of the same run without offload. In process (--no-ray), where DeepSpeed's own log can be read:
    on CPU workers the parameters' offload moves nothing, so what shows it is the config DeepSpeed parsed."""
    short = ("deepspeed.stage=3", "train.max_steps=3", "eval.at_start=false", "eval.at_end=false", "eval.generate=null")
    plain = train_tiny(tmp_path, *short, extra_args=("--no-ray",), run_name="plain")
    with deepspeed_log() as log:
        offloaded = train_tiny(tmp_path, *short, "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
                               extra_args=("--no-ray",), run_name="offloaded")
    for line in ("offload_optimizer=DeepSpeedZeroOffloadOptimizerConfig(device='cpu'",  # the config it parsed
                 "offload_param=DeepSpeedZeroOffloadParamConfig(device='cpu'",
                 "DeepSpeed Basic Optimizer = DeepSpeedCPUAdam"):  # and acted on: not its FusedAdam
        assert line in log.getvalue(), line
    records, reference = [[e for e in read_events(run) if "loss" in e] for run in (offloaded, plain)]
    assert [e["loss"] for e in records] == pytest.approx([e["loss"] for e in reference], rel=1e-5)
    assert [e["grad_norm"] for e in records] == pytest.approx([e["grad_norm"] for e in reference], rel=1e-5)


@contextlib.contextmanager
def deepspeed_log():
    """DeepSpeed's own INFO records meanwhile (its logger says WARNING and does not propagate)."""
    import logging

    from deepspeed.utils import logger

    text, level = io.StringIO(), logger.level
    handler = logging.StreamHandler(text)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield text
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
