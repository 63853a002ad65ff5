"""A real multi-node Ray cluster on this machine (cluster/local/start.sh: a head and a worker node, two
raylets), training runs submitted to it as Ray jobs through launch/submit.sh, and the placement,
checkpoints, resume and stop semantics seen from outside: job status, job logs, run folder, Ray's
actor table.

The cluster gets its own ports and temp dir, and its address reaches only the subprocesses here, so
it never meets the session's in-process Ray (conftest `ray_cluster`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG, read_events

# Starting the two-node cluster and each job take minutes on 2 cores: the module's own limit.
pytestmark = pytest.mark.timeout(900)

PORT = 6420
BIN = Path(sys.executable).parent  # this environment's ray, sft-dist and python
RUN = ["--set", "ray.shared_storage=true", "--set", "ray.placement_strategy=STRICT_SPREAD",
       "--set", "eval.generate=null", "--set", "checkpoint.every_steps=3"]


@pytest.fixture(scope="module")
def cluster():
    """Start the two-node cluster with the project's script; stop it afterwards, also after failures."""
    temp_dir = tempfile.mkdtemp(prefix="sftray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SFT_DIST_RAY_PORT=str(PORT), SFT_DIST_RAY_DASHBOARD_PORT="8295", SFT_DIST_RAY_CLIENT_PORT="6421",
               SFT_DIST_RAY_TEMP_DIR=temp_dir, SFT_DIST_RAY_WORKER_NODES="1", SFT_DIST_RAY_CPUS_PER_NODE="2",
               RAY_BIN=str(BIN / "ray"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               # This checkout's sft_dist wherever the environment installed another (jobs import the
               # uploaded copy of it, first on their PYTHONPATH).
               PYTHONPATH=str(REPO))
    try:
        started = subprocess.run(["bash", "cluster/local/start.sh"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=400)
        assert started.returncode == 0, started.stderr
        for line in started.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        yield env
    finally:
        subprocess.run(["bash", "cluster/local/stop.sh"], cwd=REPO, env=env, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(env: dict, job_id: str, *args: str, wait: bool = True) -> subprocess.CompletedProcess:
    command = ["bash", "launch/submit.sh", str(TINY_CONFIG.relative_to(REPO)), "--submission-id", job_id, *args]
    return subprocess.run(command + ([] if wait else ["--no-wait"]), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def ray_cli(env: dict, *args: str) -> str:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True,
                          text=True, timeout=120, check=True).stdout


def job_status(env: dict, job_id: str) -> str:
    jobs = json.loads(ray_cli(env, "list", "jobs", "--address", f"127.0.0.1:{PORT}", "--format", "json"))
    return next(job["status"] for job in jobs if job["submission_id"] == job_id)


def worker_nodes(env: dict, pids: list[int]) -> set[str]:
    """The Ray nodes of the train workers with these process ids (Ray's actor table keeps dead actors)."""
    actors = json.loads(ray_cli(env, "list", "actors", "--address", f"127.0.0.1:{PORT}", "--detail",
                                "--filter", "class_name=RayTrainWorker", "--format", "json", "--limit", "1000"))
    return {a["node_id"] for a in actors if a["pid"] in pids}


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_step_*") if (p / "sft_dist_checkpoint.json").is_file())


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    output = tmp_path_factory.mktemp("cluster_runs")
    result = submit(cluster, "first", "--set", f"output_dir={output}", "--set", "run_name=multi",
                    "--set", "train.max_steps=6", *RUN)
    return result, output / "multi"


def test_job_on_two_nodes_succeeds_with_metrics_and_checkpoint(cluster, first_run):
    result, run_dir = first_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert job_status(cluster, "first") == "SUCCEEDED"
    logs = ray_cli(cluster, "job", "logs", "first")
    assert "train step 6/6" in logs and "loss" in logs and "preflight: 2 workers checked in" in logs
    losses = [e["loss"] for e in read_events(run_dir) if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert checkpoints(run_dir) == ["checkpoint_step_0000003", "checkpoint_step_0000006"]
    preflight = next(e for e in read_events(run_dir) if e.get("event") == "preflight")
    pids = [w["pid"] for w in preflight["workers"]]
    assert len(worker_nodes(cluster, pids)) == 2  # STRICT_SPREAD: one worker on each Ray node


def test_node_local_storage_is_refused_on_two_nodes(cluster, tmp_path):
    result = submit(cluster, "refused", "--set", f"output_dir={tmp_path}", "--set", "run_name=local")
    assert result.returncode == 2
    assert "ray.shared_storage: true" in result.stdout + result.stderr
    assert not (tmp_path / "local").exists()


def test_resume_auto_continues_the_run(cluster, first_run):
    result, run_dir = first_run
    assert result.returncode == 0
    again = submit(cluster, "resumed", "--set", f"output_dir={run_dir.parent}", "--set", "run_name=multi",
                   "--set", "train.max_steps=9", "--resume", "auto", *RUN)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed at step 6" in ray_cli(cluster, "job", "logs", "resumed")
    steps = [e["step"] for e in read_events(run_dir) if "loss" in e]
    assert steps == list(range(1, 10))  # one record per step, across both jobs
    assert checkpoints(run_dir)[-1] == "checkpoint_step_0000009"


def test_job_stop_saves_a_checkpoint_on_the_way_out(cluster, tmp_path):
    run_dir = tmp_path / "stopped"
    started = submit(cluster, "stopped", "--set", f"output_dir={tmp_path}", "--set", "run_name=stopped",
                     "--set", "train.max_steps=500", *RUN, "--set", "checkpoint.every_steps=1000", wait=False)
    assert started.returncode == 0, started.stderr
    deadline = time.time() + 300
    while not any("loss" in e for e in read_events_if_any(run_dir)):
        assert time.time() < deadline, "training did not start"
        time.sleep(2)
    ray_cli(cluster, "job", "stop", "stopped")
    assert job_status(cluster, "stopped") == "STOPPED"
    last_step = max(e["step"] for e in read_events(run_dir) if "loss" in e)
    assert checkpoints(run_dir), "no checkpoint saved on the way out"
    assert checkpoints(run_dir)[-1] == f"checkpoint_step_{last_step:07d}"


def read_events_if_any(run_dir: Path) -> list[dict]:
    return read_events(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
