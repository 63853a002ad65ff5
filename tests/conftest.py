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
    """Token-weighted loss of `model` on a run's tokenized eval set, one example at a time, by the model's
    own loss (fixtures.exported.hf_eval_loss)."""
    import glob

    import datasets

    from fixtures.exported import hf_eval_loss

    (eval_dir,) = glob.glob(str(output_dir / ".cache" / "data" / "*" / "eval"))
    return hf_eval_loss(model, datasets.load_from_disk(eval_dir))


# Fake credentials for the S3 API server: moto accepts any; the secrets tests look for this one.
FAKE_SECRET = "sft-dist-fake-secret-5b0e7c41"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIASFTDISTFAKE00001", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
BUCKET = "sft-dist"


def start_s3_server(log_dir: Path, **env: str):
    """A real S3 API server (moto's server mode) on a free port of 127.0.0.1; returns (process, "host:port")."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **env}, stdout=(log_dir / "moto.log").open("w"),
                              stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return server, f"127.0.0.1:{port}"
        except OSError:
            assert server.poll() is None and time.time() < deadline, (log_dir / "moto.log").read_text()
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """The server with the bucket BUCKET; yields its endpoint ("127.0.0.1:PORT")."""
    import pyarrow.fs

    server, endpoint = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        os.environ.update(S3_CREDENTIALS)  # this process's own store clients (exports, checks) use them too
        store = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)
        store.create_dir(BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
