"""Shared test fixtures: one real Ray cluster per session, and the tiny config with a private run folder.

Runs go through `sft_dist.cli.main` in this process, so they join the session's Ray cluster instead of
starting their own (the launcher reuses an initialized Ray).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sft_dist import quiet

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"

# Ray Train's controller polls its workers every 2 s by default, so each run's start and end wait for polls:
# at 0.5 s a tiny run takes ~4 s less of its ~30 s (measured), and nothing the tests check depends on it.
# Set before the session's Ray starts, so its controllers (and the drivers of subprocess tests) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
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


@dataclass
class StoppedRun:
    run_dir: Path
    exit_code: int
    out: str  # what the driver printed, as a user sees it (Ray forwards the workers' lines)
    err: str


@pytest.fixture(scope="session")
def stopped_ray_run(ray_cluster, tmp_path_factory) -> StoppedRun:
    """One short real run on the session's Ray that serves several tests (the clean log, the first step
    against plain PyTorch, a stop agreed by all ranks): 2 workers x grad_accum 2 x micro-batch 2, ZeRO-2,
    validated at the start, and stopped by a SIGTERM to the driver once step 2 is logged. On Ray that
    stop reaches rank 0 alone (the driver's control queue), so the ranks must agree on it."""
    from sft_dist.cli import main

    output_dir = tmp_path_factory.mktemp("stopped")
    args = ["train", str(TINY_CONFIG), "--set", f"output_dir={output_dir}", "--set", "run_name=run",
            *[a for o in ("train.max_steps=1000", "train.micro_batch_size=2", "train.grad_accum=2",
                          "eval.generate=null") for a in ("--set", o)]]
    running = threading.Event()
    running.set()
    signaller = threading.Thread(target=sigterm_at_step, args=(output_dir / "run", 2, running), daemon=True)
    # A SIGTERM that came after the driver put back the previous handler must not end the session.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with printed_output(output_dir) as printed:
            signaller.start()
            code = main(args)
            running.clear()
            time.sleep(2)  # Ray forwards worker output a little behind
    finally:
        running.clear()
        signaller.join(timeout=10)
        signal.signal(signal.SIGTERM, previous)
    return StoppedRun(output_dir / "run", code, printed["out"], printed["err"])


def sigterm_at_step(run_dir: Path, step: int, running: threading.Event, timeout_s: float = 600) -> None:
    """SIGTERM to this process, as `ray job stop` or `scancel` sends one, once `step` is in metrics.jsonl."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout_s
    while running.is_set() and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= step:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.2)


@contextlib.contextmanager
def printed_output(folder: Path) -> Iterator[dict[str, str]]:
    """Everything this process prints meanwhile, through Python's streams and at file descriptors 1 and 2
    (C++ logging): what capfd sees, for a session fixture (pytest's capture fixtures are per test)."""
    printed: dict[str, str] = {}
    paths = {1: folder / "stdout.txt", 2: folder / "stderr.txt"}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in paths}
    # Append mode: Python's writes and the descriptors' share one file without overwriting each other.
    files = {fd: open(path, "a", buffering=1) for fd, path in paths.items()}
    try:
        for fd, handle in files.items():
            os.dup2(handle.fileno(), fd)
        with contextlib.redirect_stdout(files[1]), contextlib.redirect_stderr(files[2]):
            yield printed
    finally:
        for fd, handle in files.items():
            handle.flush()
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            handle.close()
        printed.update(out=paths[1].read_text(errors="replace"), err=paths[2].read_text(errors="replace"))


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


def learning_rates(run_dir: Path) -> list[float]:
    return [e["lr"] for e in read_events(run_dir) if "loss" in e]


def train_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if "loss" in e]


def eval_losses(run_dir: Path) -> list[float]:
    return [e["eval_loss"] for e in read_events(run_dir) if "eval_loss" in e]


def model_loss_sum(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """One example's loss by the model's own `labels=` path (transformers shifts the labels itself): the
    sum over its supervised tokens, and their count. The oracle for sft_dist.modeling.loss, which it never calls."""
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
