"""Checkpoints: automatic recovery from worker failures, manual resume, torn checkpoints, export.
Real Ray workers and DeepSpeed engines; losses compared with uninterrupted runs of the same config."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

from sft_dist import checkpoint
from sft_dist.cli import main

from conftest import (BASELINE_STEPS, REPO, TINY_CONFIG, eval_losses, read_events, subprocess_env, train_losses,
                      train_tiny)
from fixtures.exported import hf_eval_loss, saved_rows

RTOL = 1e-5  # CPU, fp32: a resumed run must retrace the uninterrupted one


@pytest.fixture(scope="module")
def failed_zero2_run(ray_cluster, tmp_path_factory):
    """Rank 1 raises at step 7; Ray restarts the workers, which resume from the step-5 checkpoint."""
    return train_tiny(tmp_path_factory.mktemp("fail2"), f"train.max_steps={BASELINE_STEPS}", "deepspeed.stage=2",
                      "checkpoint.every_steps=5", "debug.fail_at_step=7", "debug.fail_rank=1",
                      "ray.max_failures=1")


@pytest.fixture(scope="module")
def failed_zero3_run(ray_cluster, tmp_path_factory):
    """Rank 0's process dies outright (os._exit) at step 7, under ZeRO-3."""
    return train_tiny(tmp_path_factory.mktemp("fail3"), f"train.max_steps={BASELINE_STEPS}", "deepspeed.stage=3",
                      "checkpoint.every_steps=5", "debug.fail_at_step=7", "debug.fail_mode=exit",
                      "ray.max_failures=1")


@pytest.mark.parametrize("failed, baseline", [("failed_zero2_run", "zero2_run"), ("failed_zero3_run", "zero3_run")])
def test_a_failed_worker_is_restarted_and_the_run_retraces_the_uninterrupted_one(failed, baseline, request):
    failed_dir, baseline_dir = request.getfixturevalue(failed), request.getfixturevalue(baseline)
    assert (failed_dir / ".debug-failed-at-step-7").exists()  # the failure really happened
    resumes = [e for e in read_events(failed_dir) if e.get("event") == "resume"]
    assert [e["step"] for e in resumes] == [5]
    steps = [e["step"] for e in read_events(failed_dir) if "loss" in e]
    assert steps == list(range(1, BASELINE_STEPS + 1))  # each step recorded once
    assert train_losses(failed_dir) == pytest.approx(train_losses(baseline_dir), rel=RTOL)
    assert json.loads((failed_dir / "summary.json").read_text())["status"] == "completed"


def test_resume_auto_continues_a_finished_run_like_one_longer_run(ray_cluster, tmp_path):
    constant = ("train.scheduler=constant", "train.warmup_ratio=0", "checkpoint.every_steps=3", "eval.generate=null")
    longer = train_tiny(tmp_path / "long", "train.max_steps=8", *constant)
    short = train_tiny(tmp_path / "short", "train.max_steps=4", *constant)
    resumed = train_tiny(tmp_path / "short", "train.max_steps=8", *constant, extra_args=("--resume", "auto"))
    assert resumed == short
    assert [e["step"] for e in read_events(resumed) if e.get("event") == "resume"] == [4]
    assert train_losses(resumed) == pytest.approx(train_losses(longer), rel=RTOL)


def test_resume_refuses_a_config_that_changes_the_batch(failed_zero2_run, capsys):
    code = main(["train", str(failed_zero2_run / "config.yaml"), "--set", "train.micro_batch_size=2",
                 "--resume", str(failed_zero2_run)])
    assert code == 2
    assert "train.micro_batch_size*grad_accum*num_workers" in capsys.readouterr().err


def test_a_torn_checkpoint_is_skipped_for_the_previous_complete_one(tmp_path, capsys):
    run = train_tiny(tmp_path, "train.max_steps=4", "checkpoint.every_steps=2", "eval.generate=null",
                     "checkpoint.export_at_end=true", extra_args=("--no-ray",))
    assert (run / "model" / "model.safetensors").is_file()  # export_at_end
    latest = run / checkpoint.folder_name(4)
    shard = next((latest / checkpoint.TAG).glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # a crash mid-write
    assert "truncated" in checkpoint.problem(latest)
    resumed = train_tiny(tmp_path, "train.max_steps=4", "checkpoint.every_steps=2", "eval.generate=null",
                         extra_args=("--no-ray", "--resume", str(run)), run_name="again")
    out = capsys.readouterr().out
    assert f"skipping checkpoint {latest}" in out and "resumed at step 2" in out
    assert train_losses(resumed) == pytest.approx(train_losses(run)[2:], rel=RTOL)


@pytest.mark.parametrize("run", ["failed_zero2_run", "failed_zero3_run"])
def test_export_gives_the_model_the_engine_evaluated(run, request, tmp_path):
    run_dir = request.getfixturevalue(run)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "chat_template.jinja").is_file()
    # 63 validation examples on 2 ranks: the odd one out is counted once, and the all-reduced, token-weighted
    # eval_loss equals this single-process computation.
    rows = saved_rows(run_dir, "eval")
    assert len(rows) % 2 == 1  # not divisible by the world size
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_eval_loss(model, rows) == pytest.approx(eval_losses(run_dir)[-1], rel=1e-5)


@pytest.mark.parametrize("stage, run, baseline",
                         [(2, "failed_zero2_run", "zero2_run"), (3, "failed_zero3_run", "zero3_run")])
def test_resume_at_another_world_size_continues_the_trajectory(stage, run, baseline, request, tmp_path):
    """2 workers -> 1 worker (grad_accum 2 keeps the global batch) through a universal checkpoint."""
    run_dir, baseline_dir = request.getfixturevalue(run), request.getfixturevalue(baseline)
    one = train_tiny(tmp_path, f"train.max_steps={BASELINE_STEPS}", f"deepspeed.stage={stage}",
                     "ray.num_workers=1", "train.grad_accum=2", "eval.generate=null",
                     extra_args=("--resume", str(run_dir / checkpoint.folder_name(10))))
    assert [e["step"] for e in read_events(one) if e.get("event") == "resume"] == [10]
    assert train_losses(one) == pytest.approx(train_losses(baseline_dir)[10:], rel=1e-4)


def test_sigterm_finishes_the_step_saves_and_stops_then_resume_continues(tmp_path):
    """What `ray job stop`, `scancel` or a node shutdown do to the driver: the run saves and exits 143."""
    command = [sys.executable, "-m", "sft_dist", "train", str(TINY_CONFIG), "--no-ray", "--set", f"output_dir={tmp_path}",
               "--set", "run_name=r", "--set", "train.max_steps=100000", "--set", "eval.generate=null"]
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):
        assert proc.poll() is None and time.time() < deadline, f"the run never got to step 3: {proc.stdout.read()}"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"]) == ("stopped", "stop")
    stopped_at = summary["steps"]
    assert checkpoint.problem(tmp_path / "r" / checkpoint.folder_name(stopped_at)) is None
    resumed = train_tiny(tmp_path, f"train.max_steps={stopped_at + 2}", "eval.generate=null",
                         extra_args=("--no-ray", "--resume", "auto"), run_name="r")
    assert [e["step"] for e in read_events(resumed) if e.get("event") == "resume"] == [stopped_at]
    assert json.loads((resumed / "summary.json").read_text())["status"] == "completed"
