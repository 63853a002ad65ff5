"""A cluster whose nodes share nothing but an object store: the head node (where the job's driver runs)
holds the data, the model folder and the run folder; the worker node runs in its own mount namespace with
those folders hidden under empty tmpfs mounts (cluster/local/start.sh, SFT_DIST_RAY_ISOLATE); checkpoints
go to a real S3 API server (moto) named by `ray.storage_path=s3://...?endpoint_override=...`, and the
nodes' environment has only the credentials. Jobs go through launch/submit.sh, as a user's would.

Loss baselines are the session's uninterrupted in-process runs (conftest zero2_run, zero3_run): same
config, so a recovered run must reproduce them step for step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sft_dist.cli import main

from conftest import BASELINE_STEPS, BUCKET, FAKE_SECRET, REPO, S3_CREDENTIALS, TINY_CONFIG, read_events

# The module's cluster fixture builds the loss baselines (if the session has not), starts two nodes and
# runs the first job: minutes on 2 shared cores.
pytestmark = pytest.mark.timeout(1800)
PORT, DASHBOARD_PORT, CLIENT_PORT = 6440, 8315, 6441
BIN = Path(sys.executable).parent
MODEL = REPO / "configs" / "models" / "tiny-llama"
DATA = REPO / "configs" / "data" / "dates"


@dataclass
class Cluster:
    env: dict[str, str]
    driver_files: Path  # what only the head node sees: data, model, run folders
    storage: str  # ray.storage_path
    temp_dir: Path


def namespaces_refused() -> str | None:
    if os.geteuid() != 0:
        return "mount namespaces need root"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"mount namespaces refused here: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def cluster(zero2_run, zero3_run, s3_store, tmp_path_factory):
    """Baselines first: the session's in-process Ray must start before this cluster exists."""
    reason = namespaces_refused()
    if reason:
        pytest.skip(reason)
    driver_files = tmp_path_factory.mktemp("driver_files")
    shutil.copytree(MODEL, driver_files / "model")
    shutil.copytree(DATA, driver_files / "data")
    temp_dir = Path(tempfile.mkdtemp(prefix="sftobj-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL")}
    env.update(S3_CREDENTIALS, SFT_DIST_RAY_PORT=str(PORT), SFT_DIST_RAY_DASHBOARD_PORT=str(DASHBOARD_PORT),
               SFT_DIST_RAY_CLIENT_PORT=str(CLIENT_PORT), SFT_DIST_RAY_TEMP_DIR=str(temp_dir),
               SFT_DIST_RAY_WORKER_NODES="1", SFT_DIST_RAY_CPUS_PER_NODE="2", SFT_DIST_RAY_ISOLATE=str(driver_files),
               # Each node's cache of shipped folders: on the head a real folder, on the worker inside its tmpfs.
               SFT_DIST_CACHE_DIR=str(driver_files / "node-cache"),
               RAY_BIN=str(BIN / "ray"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    try:
        started = subprocess.run(["bash", "cluster/local/start.sh"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=400)
        assert started.returncode == 0, started.stderr
        for line in started.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        worker_pid = (temp_dir / "sft_dist_nodes" / "worker-1.pid").read_text().strip()
        # The worker node's own view of the filesystem: the driver's model folder is not there.
        assert (driver_files / "model" / "config.json").is_file()
        assert not Path(f"/proc/{worker_pid}/root{driver_files}/model/config.json").exists()
        yield Cluster(env, driver_files, f"s3://{BUCKET}/runs?endpoint_override={s3_store}&scheme=http", temp_dir)
    finally:
        subprocess.run(["bash", "cluster/local/stop.sh"], cwd=REPO, env=env, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


OUTPUTS: list[str] = []  # every submission's stdout and stderr, for the secrets test


def submit(cluster: Cluster, job_id: str, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    files = cluster.driver_files
    args = [f"output_dir={files / 'runs'}", f"ray.storage_path={cluster.storage}",
            f"model.name_or_path={files / 'model'}",
            f"data.train={files / 'data' / 'train.jsonl'}", f"data.eval={files / 'data' / 'eval.jsonl'}",
            "ray.placement_strategy=STRICT_SPREAD", *overrides]
    command = ["bash", "launch/submit.sh", str(TINY_CONFIG.relative_to(REPO)), "--submission-id", job_id,
               *[a for o in args for a in ("--set", o)], *(["--resume", "auto"] if resume else [])]
    result = subprocess.run(command, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=900)
    OUTPUTS.extend([result.stdout, result.stderr])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return result


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last record of each step (a replayed step after a recovery is recorded once anyway)."""
    return {e["step"]: e["loss"] for e in read_events(run_dir) if "loss" in e}


def assert_same_losses(run_dir: Path, baseline: Path) -> None:
    ours, reference = losses_by_step(run_dir), losses_by_step(baseline)
    assert sorted(ours) == sorted(reference) == list(range(1, BASELINE_STEPS + 1))
    for step in reference:
        assert ours[step] == pytest.approx(reference[step], rel=1e-5), step


def shipping_events(run_dir: Path) -> list[dict[int, dict]]:
    return [{r["rank"]: r for r in e["ranks"]} for e in read_events(run_dir) if e.get("event") == "shipping"]


def assert_recovered_from_the_bucket(run_dir: Path, step: int) -> None:
    resumes = [e for e in read_events(run_dir) if e.get("event") == "resume"]
    assert len(resumes) == 1, resumes
    assert resumes[0]["checkpoint"].startswith(f"s3://{BUCKET}/runs/{run_dir.name}/checkpoint_step_{step:07d}")
    first, restarted = shipping_events(run_dir)
    # The head's rank used the driver's own folders; the isolated node's rank fetched them (or found them
    # cached by an earlier job); after the restart nobody fetches again.
    for kind in ("data", "model"):
        found = sorted(r[kind] for r in first.values())
        assert found[1] == "in place" and found[0] in ("cached", "fetched"), found
    assert {r["data"] for r in restarted.values()} | {r["model"] for r in restarted.values()} <= {"cached", "in place"}


def isolated_cache(cluster: Cluster, kind: str) -> list[str]:
    """The worker node's own cache of shipped folders, seen through its mount namespace."""
    pid = (cluster.temp_dir / "sft_dist_nodes" / "worker-1.pid").read_text().strip()
    folder = Path(f"/proc/{pid}/root{cluster.driver_files}/node-cache/shipped/{kind}")
    return sorted(p.name for p in folder.iterdir())


KILL = ("debug.fail_rank=1", "debug.fail_mode=exit", "ray.max_failures=1")


@pytest.fixture(scope="module")
def zero3_recovered(cluster):
    """ZeRO-3; rank 1 dies right after the step-5 checkpoint (before Ray may have registered it)."""
    submit(cluster, "zero3", "deepspeed.stage=3", f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=5",
           "debug.fail_at_step=6", *KILL, "checkpoint.export_at_end=true", "run_name=zero3")
    return cluster.driver_files / "runs" / "zero3"


def test_zero3_recovers_from_the_bucket_with_the_uninterrupted_losses_and_exports(zero3_recovered, zero3_run):
    assert_recovered_from_the_bucket(zero3_recovered, 5)
    assert_same_losses(zero3_recovered, zero3_run)
    exported = zero3_recovered / "model"
    assert json.loads((exported / "sft_dist_export.json").read_text())["step"] == BASELINE_STEPS
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.fixture(scope="module")
def zero2_recovered(cluster):
    submit(cluster, "zero2", "deepspeed.stage=2", f"train.max_steps={BASELINE_STEPS}", "checkpoint.every_steps=4",
           "debug.fail_at_step=5", *KILL, "run_name=zero2")
    return cluster.driver_files / "runs" / "zero2"


def test_zero2_recovers_then_resume_auto_continues_from_the_bucket(cluster, zero2_recovered, zero2_run, tmp_path,
                                                                    monkeypatch):
    assert_recovered_from_the_bucket(zero2_recovered, 4)
    assert_same_losses(zero2_recovered, zero2_run)
    submit(cluster, "zero2-more", "deepspeed.stage=2", f"train.max_steps={BASELINE_STEPS + 2}",
           "checkpoint.every_steps=4", "run_name=zero2", resume=True)
    resumes = [e for e in read_events(zero2_recovered) if e.get("event") == "resume"]
    assert resumes[-1]["checkpoint"].startswith(f"s3://{BUCKET}/runs/zero2/checkpoint_step_{BASELINE_STEPS:07d}")
    assert sorted(losses_by_step(zero2_recovered)) == list(range(1, BASELINE_STEPS + 3))
    # Shipped once per node: the second job finds both folders on both nodes; the isolated node holds one
    # copy of each (the ZeRO-3 job's data and model are the same content: the same keys).
    last = shipping_events(zero2_recovered)[-1]
    assert {r["data"] for r in last.values()} | {r["model"] for r in last.values()} <= {"cached", "in place"}
    for kind in ("data", "model"):
        copies = isolated_cache(cluster, kind)
        assert len([c for c in copies if not c.endswith(".lock")]) == 1, copies
    # `sft-dist export s3://...`: the endpoint from the standard variable, as any S3 client would take it.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{cluster.storage.split('endpoint_override=')[1].split('&')[0]}")
    last_checkpoint = f"s3://{BUCKET}/runs/zero2/checkpoint_step_{BASELINE_STEPS + 2:07d}"
    assert main(["export", last_checkpoint, "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "sft_dist_export.json").read_text())["step"] == BASELINE_STEPS + 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    # `sft-dist eval` from the store, in one process: a world-size change, so rank 0 downloads the
    # 2-worker checkpoint, converts it once to DeepSpeed's universal format and uploads that beside it.
    files = cluster.driver_files
    assert main(["eval", str(TINY_CONFIG), "--no-ray", "--set", f"output_dir={tmp_path / 'eval'}",
                 "--set", f"model.name_or_path={files / 'model'}", "--set", f"data.train={files / 'data/train.jsonl'}",
                 "--set", f"data.eval={files / 'data/eval.jsonl'}", "--set", "eval.generate=null",
                 "--checkpoint", f"s3://{BUCKET}/runs/zero2"]) == 0
    (evaluated,) = (tmp_path / "eval").glob("eval-*/eval.json")
    result = json.loads(evaluated.read_text())
    step = int(result["checkpoint"].split("checkpoint_step_")[1][:7])
    recorded = [e["eval_loss"] for e in read_events(zero2_recovered) if e.get("step") == step and "eval_loss" in e]
    assert result["eval_loss"] == pytest.approx(recorded[-1], rel=1e-5)  # 1 process = the run's 2 workers


def test_a_lora_run_on_the_store_exports_its_adapter(cluster, tmp_path):
    from peft import PeftModel

    submit(cluster, "lora", "peft.method=lora", "peft.r=8", "train.lr=1e-2", "train.max_steps=3",
           "checkpoint.every_steps=3", "eval.generate=null", "eval.at_start=false", "run_name=lora")
    assert main(["export", f"{cluster.storage.replace('/runs?', '/runs/lora?')}", "--out",
                 str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(MODEL)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), tmp_path / "adapter")
    ids = base.config.bos_token_id or 1
    import torch

    inputs = torch.tensor([[ids, 5, 6, 7]])
    assert not torch.allclose(base(inputs).logits, tuned(inputs).logits)  # the trained adapter, not B = 0


def test_no_credential_reaches_the_run_folders_logs_or_output(cluster, zero3_recovered, zero2_recovered):
    files = [p for p in (cluster.driver_files / "runs").rglob("*") if p.is_file()]
    files += [p for p in cluster.temp_dir.rglob("*.log") if p.is_file()] + [
        p for p in cluster.temp_dir.rglob("*.out") if p.is_file()] + [p for p in cluster.temp_dir.rglob("*.err")]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    leaking = [str(p) for p in files if FAKE_SECRET.encode() in p.read_bytes()]
    assert leaking == []
    assert not any(FAKE_SECRET in text for text in OUTPUTS)
