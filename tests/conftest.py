"""Shared test fixtures: one real Ray cluster per session, and the tiny config with a private run folder.

Runs go through `sft_dist.cli.main` in this process, so they join the session's Ray cluster instead of
starting their own (the launcher reuses an initialized Ray).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    yield
    ray.shutdown()


def train_tiny(output_dir: Path, *overrides: str) -> Path:
    """Run `sft-dist train configs/tiny-cpu.yaml` with overrides; returns the run folder."""
    from sft_dist.cli import main

    run_name = "run"
    code = main(["train", str(TINY_CONFIG), "--set", f"output_dir={output_dir}", "--set", f"run_name={run_name}",
                 *[arg for o in overrides for arg in ("--set", o)]])
    assert code == 0, f"training exited {code}"
    return output_dir / run_name


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if "loss" in e]


def eval_losses(run_dir: Path) -> list[float]:
    return [e["eval_loss"] for e in read_events(run_dir) if "eval_loss" in e]
