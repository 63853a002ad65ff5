"""Checkpoints: automatic recovery from worker failures, manual resume, torn checkpoints, export.
Real Ray workers and DeepSpeed engines; losses compared with uninterrupted runs of the same config."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sft_dist import checkpoints
from sft_dist.cli import main

from conftest import (
    BASELINE_STEPS,
    REPO,
    TINY_CONFIG,
    eval_losses,
    learning_rates,
    read_events,
    subprocess_env,
    train_losses,
    train_tiny,
)
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


@pytest.mark.timeout(420)  # 100-135 s measured: the failed run, and the baseline when it runs first
@pytest.mark.parametrize("failed, baseline", [("failed_zero2_run", "zero2_run"), ("failed_zero3_run", "zero3_run")])
def test_a_failed_worker_is_restarted_and_the_run_retraces_the_uninterrupted_one(failed, baseline, request):
    failed_dir, baseline_dir = request.getfixturevalue(failed), request.getfixturevalue(baseline)
    assert (failed_dir / ".debug-failed-at-step-7").exists()  # the failure really happened
    resumes = [e for e in read_events(failed_dir) if e.get("event") == "resume"]
    assert [e["step"] for e in resumes] == [5]
    steps = [e["step"] for e in read_events(failed_dir) if "loss" in e]
    assert steps == list(range(1, BASELINE_STEPS + 1))  # each step recorded once
    assert train_losses(failed_dir) == pytest.approx(train_losses(baseline_dir), rel=RTOL)
    # The LR scheduler's state came back too: a fresh one would restart the warmup at step 6.
    assert learning_rates(failed_dir) == pytest.approx(learning_rates(baseline_dir), rel=1e-9)
    assert json.loads((failed_dir / "summary.json").read_text())["status"] == "completed"


def tear(folder: Path) -> None:
    """What a crash in the middle of writing a checkpoint leaves: a shard cut short."""
    shard = next((folder / checkpoints.TAG).glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in checkpoints.problem(folder)


def test_resume_auto_continues_a_finished_run_like_one_longer_run(ray_cluster, tmp_path):
    """With dropout (random numbers drawn at every step: they must continue as they were), a warmup (the
    scheduler's state must come back), and the short run's newest checkpoint torn: --resume auto starts
    from the older one, and so does the recovery from a worker failure after it."""
    # A warmup then constant: the same schedule for 4 steps and for 8, so the runs compare step by step.
    same = ("train.scheduler=constant_with_warmup", "train.warmup_ratio=0", "train.warmup_steps=2",
            "checkpoint.every_steps=3",
            "eval.generate=null", "model.dropout=0.1")
    longer = train_tiny(tmp_path / "long", "train.max_steps=8", *same)
    short = train_tiny(tmp_path / "short", "train.max_steps=4", *same)
    tear(short / checkpoints.folder_name(4))
    resumed = train_tiny(tmp_path / "short", "train.max_steps=8", *same, "debug.fail_at_step=6", "ray.max_failures=1",
                         extra_args=("--resume", "auto"))
    assert resumed == short and (resumed / ".debug-failed-at-step-6").exists()
    resumes = [e for e in read_events(resumed) if e.get("event") == "resume"]
    assert [e["step"] for e in resumes] == [3, 3]  # --resume auto, then Ray's restart after the failure
    assert all(any("truncated" in reason for reason in e["skipped"]) for e in resumes[1:])
    assert [e["step"] for e in read_events(resumed) if "loss" in e] == list(range(1, 9))
    assert train_losses(resumed) == pytest.approx(train_losses(longer), rel=RTOL)
    assert learning_rates(resumed) == pytest.approx(learning_rates(longer), rel=1e-9)


def test_resume_refuses_a_config_that_changes_the_batch(failed_zero2_run, tmp_path, capsys):
    # Its own output_dir: the saved config names the failed run, whose folder is taken (refused first).
    code = main(["train", str(failed_zero2_run / "config.yaml"), "--set", "train.micro_batch_size=2",
                 "--set", f"output_dir={tmp_path}", "--resume", str(failed_zero2_run)])
    assert code == 2
    assert "train.micro_batch_size*grad_accum*num_workers" in capsys.readouterr().err


def other_model(tmp: Path) -> list[str]:
    """The tiny model with another config (a different model under the same file names)."""
    copy = tmp / "tiny-llama"
    shutil.copytree(REPO / "configs" / "models" / "tiny-llama", copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5, "rope_theta": 5000.0}))
    return [f"model.name_or_path={copy}"]


def other_data_content(tmp: Path) -> list[str]:
    """The training file under the same name, of the same size, with other bytes."""
    original = (REPO / "configs" / "data" / "dates" / "train.jsonl").read_bytes()
    (tmp / "train.jsonl").write_bytes(original.replace(b"2017", b"2018"))
    assert (tmp / "train.jsonl").stat().st_size == len(original) and b"2017" in original
    return [f"data.train={tmp / 'train.jsonl'}"]


@pytest.mark.parametrize("change, key", [
    (lambda tmp: ["seed=7"], "seed"),
    (lambda tmp: ["deepspeed.stage=3"], "deepspeed.stage"),
    (lambda tmp: ["train.precision=bf16"], "train.precision"),
    (other_model, "model"),
    (other_data_content, "data"),
], ids=["seed", "stage", "precision", "model", "data-content"])
def test_resume_refuses_a_change_the_checkpoint_cannot_follow(failed_zero2_run, change, key, tmp_path, capsys):
    # Its own output_dir: a change that got past the check would tokenize into the failed run's cache.
    overrides = [a for o in [f"output_dir={tmp_path}", *change(tmp_path)] for a in ("--set", o)]
    code = main(["train", str(failed_zero2_run / "config.yaml"), *overrides, "--resume", str(failed_zero2_run)])
    err = capsys.readouterr().err
    assert code == 2 and f"a resume cannot follow: {key} (checkpoint" in err, err


def test_export_picks_the_best_checkpoint_and_a_torn_one_is_skipped_for_the_previous(tmp_path, capsys):
    # eval.mode=max on a falling eval_loss: the best checkpoint (step 2) is not the latest (step 4).
    run = train_tiny(tmp_path, "train.max_steps=4", "checkpoint.every_steps=2", "eval.generate=null",
                     "eval.every_steps=2", "eval.mode=max", "checkpoint.export_at_end=true", extra_args=("--no-ray",))
    evals = {e["step"]: e["eval_loss"] for e in read_events(run) if "eval_loss" in e}
    assert list(evals) == [0, 2, 4] and evals[0] > evals[2] > evals[4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_checkpoint"]["step"] == 2 and summary["best_checkpoint"]["path"].endswith("0000002")
    assert summary["best"] == {"metric": "eval_loss", "value": evals[0], "step": 0}  # before any checkpoint
    # export_at_end wrote the best checkpoint's weights: the model's own loss on the eval set is step 2's.
    rows = saved_rows(run, "eval")
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    assert hf_eval_loss(model, rows) == pytest.approx(evals[2], rel=1e-5)
    latest = run / checkpoints.folder_name(4)
    tear(latest)
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
    """2 workers -> 1 worker (grad_accum 2 keeps the global batch) through a universal checkpoint; the one
    worker in process (--no-ray): the checkpoint's conversion is the subject, not Ray."""
    run_dir, baseline_dir = request.getfixturevalue(run), request.getfixturevalue(baseline)
    one = train_tiny(tmp_path, f"train.max_steps={BASELINE_STEPS}", f"deepspeed.stage={stage}",
                     "train.grad_accum=2", "eval.generate=null",
                     extra_args=("--no-ray", "--resume", str(run_dir / checkpoints.folder_name(10))))
    assert [e["step"] for e in read_events(one) if e.get("event") == "resume"] == [10]
    assert train_losses(one) == pytest.approx(train_losses(baseline_dir)[10:], rel=1e-4)


def test_sigterm_finishes_the_step_saves_and_stops_then_resume_continues(tmp_path):
    """What `ray job stop`, `scancel` or a node shutdown do to the driver: the run saves and exits 143."""
    command = [sys.executable, "-m", "sft_dist", "train", str(TINY_CONFIG), "--no-ray", "--set",
               f"output_dir={tmp_path}",
               "--set", "run_name=r", "--set", "train.max_steps=100000", "--set", "eval.generate=null"]
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
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
    assert checkpoints.problem(tmp_path / "r" / checkpoints.folder_name(stopped_at)) is None
    resumed = train_tiny(tmp_path, f"train.max_steps={stopped_at + 2}", "eval.generate=null",
                         extra_args=("--no-ray", "--resume", "auto"), run_name="r")
    assert [e["step"] for e in read_events(resumed) if e.get("event") == "resume"] == [stopped_at]
    assert json.loads((resumed / "summary.json").read_text())["status"] == "completed"
