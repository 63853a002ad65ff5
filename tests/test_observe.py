"""Seeing a run: the loss plot, the TensorBoard and MLflow sinks and the timing breakdown (one real run
serves them all), the progress display's plain and live modes, and a missing sink package as a config
error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from sft_dist.driver.metrics import RunRecorder

from conftest import REPO, TINY_CONFIG, read_events, train_tiny

STEPS = 6


@pytest.fixture(scope="module")
def observed_run(ray_cluster, tmp_path_factory):
    """2 workers, ZeRO-2, validation every 3 steps, TensorBoard + MLflow file store + timing."""
    root = tmp_path_factory.mktemp("observed")
    run_dir = train_tiny(root, f"train.max_steps={STEPS}", "eval.every_steps=3", "eval.generate=null",
                         "logging.tensorboard=true", f"logging.mlflow={root / 'mlruns'}", "logging.timing=true")
    return run_dir, root / "mlruns"


def test_run_folder_has_a_loss_plot(observed_run):
    run_dir, _ = observed_run
    png = run_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 600 and height > 400


def test_tensorboard_scalars_equal_metrics_jsonl(observed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = observed_run
    events = read_events(run_dir)
    train = [e for e in events if "loss" in e]
    evals = [e for e in events if "eval_loss" in e]
    assert [e["step"] for e in train] == list(range(1, STEPS + 1)) and [e["step"] for e in evals] == [0, 3, 6]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tb_loss = [(s.step, s.value) for s in acc.Scalars("train/loss")]
    tb_eval = [(s.step, s.value) for s in acc.Scalars("eval/loss")]
    # TensorBoard stores float32.
    assert tb_loss == [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in train]
    assert tb_eval == [(e["step"], pytest.approx(e["eval_loss"], rel=1e-6)) for e in evals]
    assert {"train/lr", "train/tokens_per_s", "train/time_forward_s", "eval/ppl"} <= set(acc.Tags()["scalars"])


def test_mlflow_file_store_has_the_run(observed_run):
    from mlflow.tracking import MlflowClient

    from sft_dist.driver.sinks import mlflow_uri

    run_dir, store = observed_run
    client = MlflowClient(tracking_uri=mlflow_uri(str(store)))
    [run] = client.search_runs([client.get_experiment_by_name("sft_dist").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == str(STEPS) and run.data.params["deepspeed.stage"] == "2"
    events = read_events(run_dir)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(e["step"], e["loss"]) for e in events if "loss" in e]
    eval_history = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.value for m in eval_history] == [e["eval_loss"] for e in events if "eval_loss" in e]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "summary.json", "config.yaml"} <= artifacts


def test_timing_breakdown_is_in_every_training_record(observed_run):
    run_dir, _ = observed_run
    events = read_events(run_dir)
    train = [e for e in events if "loss" in e]
    phases = [[e[f"time_{p}_s"] for p in ("data", "forward", "backward", "optimizer")] for e in train]
    assert len(phases) == STEPS and all(t > 0 for step in phases for t in step)
    # Mean seconds per step of each phase: all steps together are less than the run took.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(map(sum, phases)) < summary["duration_s"]
    # ZeRO-2's gradient reduce and parameter all-gather, as DeepSpeed's comms logger times them: part of
    # the backward and optimizer phases.
    comm = [e["time_comm_s"] for e in train]
    assert all(0 < c <= step[2] + step[3] for c, step in zip(comm, phases))
    assert not any(k.startswith("time_") for e in events if "eval_loss" in e for k in e)


def recorder_lines(events: list[dict], out: io.StringIO, tmp_path) -> str:
    recorder = RunRecorder(tmp_path, out=out)
    for event in events:
        recorder.record(event)
    recorder.close("completed")
    return out.getvalue()


EVENTS = [
    {"step": 0, "event": "setup", "world_size": 2, "zero_stage": 2, "param_elements_total": 1234,
     "total_steps": 4},
    {"step": 0, "eval_loss": 2.5, "eval_ppl": 12.18, "eval_token_acc": 0.25},
    {"step": 1, "epoch": 0.25, "total_steps": 4, "loss": 2.4, "lr": 1e-3, "tokens_per_s": 1500.0},
    {"step": 2, "epoch": 0.5, "total_steps": 4, "loss": 2.0, "lr": 5e-4, "tokens_per_s": 1600.0,
     "time_data_s": 0.01, "time_forward_s": 0.1, "time_backward_s": 0.2, "time_optimizer_s": 0.05,
     "time_comm_s": 0.04},
    {"step": 2, "eval_loss": 1.9, "eval_ppl": 6.69, "eval_token_acc": 0.5},
    {"step": 3, "epoch": 0.75, "total_steps": 4, "loss": 1.8, "lr": 2.5e-4, "tokens_per_s": 1700.0},
]


def test_plain_progress_prints_one_line_per_record(tmp_path):
    text = recorder_lines(EVENTS, io.StringIO(), tmp_path)
    lines = text.splitlines()
    assert "\r" not in text and "\033" not in text
    assert lines[0] == "setup: 2 workers, ZeRO-2, 1,234 parameters (1,234 trainable, 100.00%), 4 steps"
    assert lines[1].startswith("eval  step 0: eval_loss 2.5000 ppl 12.18 token_acc 0.250")
    assert lines[2] == ("train step 1/4 epoch 0.25 loss 2.4000 lr 1.00e-03 1500 tok/s eta ? "
                        "| eval_loss 2.5000 (step 0)")
    assert lines[3].startswith("train step 2/4 epoch 0.50 loss 2.0000 lr 5.00e-04 1600 tok/s eta 0:0")
    assert lines[3].endswith("| eval_loss 2.5000 (step 0) | s/step data 0.010 forward 0.100 backward 0.200 "
                             "optimizer 0.050 (comm 0.040)")
    assert lines[5].endswith("| eval_loss 1.9000 (step 2)")  # the last validation, once there is a newer one
    assert len(lines) == 6
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        0, 0, 1, 2, 2, 3]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_progress_redraws_one_line_on_a_terminal(tmp_path):
    text = recorder_lines(EVENTS, FakeTerminal(), tmp_path)
    # Each training record redraws the line in place; messages (eval) are printed above it.
    assert text.count("\r\033[2K[") >= 3 and text.endswith("\n")
    final = text.split("\r\033[2K")[-1]
    assert final.startswith("[###############-----] 3/4 ep 0.75 | loss 1.8000 | lr 2.50e-04 | 1,700 tok/s")
    assert final.rstrip().endswith("| eval_loss 1.9000 @2")
    assert "\r\033[2Keval  step 2: eval_loss 1.9000" in text


def test_requested_sink_without_its_package_exits_2():
    pytest.importorskip("tensorboard")
    if __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    result = subprocess.run([sys.executable, "-m", "sft_dist", "train", str(TINY_CONFIG), "--set",
                             "logging.wandb=my-project"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: logging.wandb: needs the wandb package, which is not installed: "
                                     "pip install 'sft_dist[wandb]'")
