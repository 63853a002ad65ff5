"""Shared test fixtures: one real Ray cluster per session, and the tiny config with a private run folder.

Runs go through `sft_dist.cli.main` in this process, so they join the session's Ray cluster instead of
starting their own (the launcher reuses an initialized Ray).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from sft_dist import quiet

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"

quiet.driver()  # as `sft-dist` does before Ray is imported: the session's Ray prints what the CLI's would


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's Ray; its value is the session folder (raw logs of every Ray process)."""
    import ray

    context = ray.init(num_cpus=4, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    yield Path(context.address_info["session_dir"])
    ray.shutdown()


BASELINE_STEPS = 12


@pytest.fixture(scope="session")
def zero2_run(ray_cluster, tmp_path_factory):
    """The reference trajectory: 2 workers x micro-batch 4 (global batch 8), ZeRO-2, no checkpoints."""
    return train_tiny(tmp_path_factory.mktemp("zero2"), f"train.max_steps={BASELINE_STEPS}", "deepspeed.stage=2")


@pytest.fixture(scope="session")
def zero3_run(ray_cluster, tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("zero3"), f"train.max_steps={BASELINE_STEPS}", "deepspeed.stage=3")


def train_tiny(output_dir: Path, *overrides: str, extra_args: tuple[str, ...] = (), run_name: str = "run") -> Path:
    """Run `sft-dist train configs/tiny-cpu.yaml` with overrides; returns the run folder."""
    from sft_dist.cli import main

    code = main(["train", str(TINY_CONFIG), "--set", f"output_dir={output_dir}", "--set", f"run_name={run_name}",
                 *[arg for o in overrides for arg in ("--set", o)], *extra_args])
    assert code == 0, f"training exited {code}"
    return output_dir / run_name


def subprocess_env() -> dict[str, str]:
    """This environment without the process-group variables an in-process --no-ray run left behind (a
    subprocess would otherwise try to join that finished group's port)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if "loss" in e]


def eval_losses(run_dir: Path) -> list[float]:
    return [e["eval_loss"] for e in read_events(run_dir) if "eval_loss" in e]


def model_loss_sum(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """One example's loss by the model's own `labels=` path (transformers shifts the labels itself): the
    sum over its supervised tokens, and their count. The oracle for sft_dist.loss, which it never calls."""
    import torch

    ids, target = torch.tensor([input_ids]), torch.tensor([labels])
    count = int((target[:, 1:] != -100).sum())
    with torch.no_grad():
        loss = model(input_ids=ids, labels=target).loss
    return loss.item() * count, count


def eval_set_loss(model, output_dir: Path) -> float:
    """Token-weighted loss of `model` on a run's tokenized eval set, one example at a time (no padding,
    nothing for a mask to hide), by the model's own loss."""
    import glob

    import datasets

    (eval_dir,) = glob.glob(str(output_dir / ".cache" / "data" / "*" / "eval"))
    loss_sum = tokens = 0.0
    for row in datasets.load_from_disk(eval_dir):
        loss, count = model_loss_sum(model, row["input_ids"], row["labels"])
        loss_sum, tokens = loss_sum + loss, tokens + count
    return loss_sum / tokens
