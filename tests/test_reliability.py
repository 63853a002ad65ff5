"""Failures that used to end "completed", lose records or leave things behind: a diverging run, a dead
model, a driver killed between checkpoints, a full disk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from sft_dist import checkpoints
from sft_dist.cli import main

from conftest import REPO, TINY_CONFIG, read_events, subprocess_env

QUIET = ("eval.at_start=false", "eval.at_end=false", "eval.generate=null", "train.warmup_ratio=0")


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [checkpoints.read_manifest(f)["step"] for f in checkpoints.complete_checkpoints(run_dir, log=lambda _: None)]


def test_non_finite_numbers_are_refused_in_every_float_key(tmp_path):
    from sft_dist import config
    from sft_dist.errors import UserError

    for override, key in (("train.lr=.inf", "train.lr"), ("train.adam_betas=[0.9, .nan]", "train.adam_betas.1"),
                          ("train.lr_overrides={lm_head: .inf}", "train.lr_overrides.lm_head"),
                          ("deepspeed.extra={optimizer: {params: {eps: .nan}}}",
                           "deepspeed.extra.optimizer.params.eps")):
        with pytest.raises(UserError) as err:
            config.load(TINY_CONFIG, [override])
        assert err.value.key == key


def test_a_diverging_run_fails_keeping_its_last_finite_checkpoint(tmp_path, capsys):
    """lr 1e30: step 1's loss is finite, its update wrecks the weights, step 2's loss is NaN."""
    code = main(["train", str(TINY_CONFIG), "--no-ray", *sets(f"output_dir={tmp_path}", "run_name=run",
                 "train.lr=1e30", "train.max_steps=4", "checkpoint.every_steps=1", *QUIET)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = {e["step"]: e["loss"] for e in read_events(run_dir) if "loss" in e}
    assert code == 1 and err.startswith("error: training failed: the training loss was nan at step 2")
    assert "its newest checkpoint, step 1, is the last finite state" in err
    assert (summary["status"], summary["stop_reason"], summary["steps"]) == ("failed", "non_finite", 2)
    assert math.isfinite(losses[1]) and math.isnan(losses[2]) and sorted(losses) == [1, 2]
    # Nothing of the diverged state was saved: the only checkpoint is step 1's, whole and finite.
    assert checkpoint_steps(run_dir) == [1] and not list(run_dir.glob("checkpoint_step_0000002*"))
    optim = torch.load(run_dir / "checkpoint_step_0000001" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=True)["optimizer_state_dict"]
    assert all(torch.isfinite(t).all() for t in optim["single_partition_of_fp32_groups"])


def test_a_dead_model_is_warned_about_and_no_ray_keeps_checkpoint_keep(tmp_path):
    """lr 1e4 saturates the tiny model: the gradient norm is exactly 0 from step 2 on."""
    code = main(["train", str(TINY_CONFIG), "--no-ray", *sets(f"output_dir={tmp_path}", "run_name=run",
                 "train.lr=1e4", "train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=2", *QUIET)])
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    norms = [e["grad_norm"] for e in read_events(run_dir) if "loss" in e]
    # The warning's step is the fifth zero norm in a row, read off the records.
    zero_run_end = next(i + 1 for i in range(4, len(norms)) if not any(norms[i - 4:i + 1]))
    assert code == 0 and summary["status"] == "completed"
    assert summary["warnings"] == [f"the gradient norm has been 0 for 5 steps (to step {zero_run_end}): the model is "
                                   "not learning (a learning rate far too high saturates it; check train.lr)"]
    # Unscored checkpoints rank by recency: Ray's rule keeps the newest `keep`; --no-ray now does too.
    assert checkpoint_steps(run_dir) == [4, 6] and not (run_dir / "checkpoint_step_0000002").exists()


def test_a_resume_fills_in_records_the_driver_never_wrote_and_drops_retrained_ones(tmp_path):
    from sft_dist.driver.metrics import RunRecorder

    def train(step: int) -> dict:
        return {"step": step, "loss": 1.0 / step, "lr": 0.1}

    path = tmp_path / "metrics.jsonl"
    written = [{"step": 0, "event": "setup"}, train(1), {"step": 1, "eval_loss": 2.0}, train(2), train(7)]
    path.write_text("".join(json.dumps(e) + "\n" for e in written) + '{"step": 8, "lo')  # torn by a crash
    recorder = RunRecorder(tmp_path)
    recorder.record({"step": 0, "event": "setup", "world_size": 2, "zero_stage": 2, "total_steps": 9,
                     "param_elements_total": 10})
    carried = [train(1), {"step": 1, "eval_loss": 2.0}, train(2), train(3), {"step": 3, "eval_loss": 1.5}, train(4)]
    recorder.record({"step": 4, "event": "resume", "checkpoint": "c", "skipped": [], "records": carried})
    events = read_events(tmp_path)
    steps = [(e["step"], "loss" in e) for e in events if not e.get("event")]
    assert steps == [(1, True), (1, False), (2, True), (3, True), (3, False), (4, True)]
    assert [e["event"] for e in events if e.get("event")] == ["setup", "setup", "resume"]
    assert "records" not in events[-1] and [e["eval_loss"] for e in recorder.evals] == [2.0, 1.5]


def session_processes(temp_dir: str) -> list[int]:
    """Processes of any Ray session kept in `temp_dir` (their command line or environment names it)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if temp_dir in " ".join(process.cmdline()) or temp_dir in " ".join(process.environ().values()):
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A Ray run (2 workers, an embedded Ray of its own) whose driver is frozen after its first record,
    then killed with SIGKILL once the workers saved step 4. Then, without Ray (1 process, grad_accum 2:
    the same global batch, another world size): a new run from that checkpoint (`--resume PATH`), and
    the killed run continued (`--resume auto`). Yields what the tests look at."""
    out = tmp_path_factory.mktemp("sigkill")
    ray_tmp = tempfile.mkdtemp(prefix="sfthd-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**subprocess_env(), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    common = sets(f"output_dir={out}", "train.max_steps=8", "checkpoint.every_steps=4", *QUIET)
    run_dir, log = out / "run", open(out / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "sft_dist", "train", str(TINY_CONFIG), *common,
                               "--set", "run_name=run"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and any(
            "loss" in e for e in read_events(run_dir)), 300, "the first training record")
        driver.send_signal(signal.SIGSTOP)  # the driver writes no more records; the workers train on
        ready = run_dir / "checkpoint_step_0000004"
        wait_for(lambda: ready.is_dir() and checkpoints.problem(ready) is None, 300, "checkpoint 4")
        driver.kill()
        driver.wait(timeout=30)
        time.sleep(10)  # the watchdog's grace period is 5 s
        left_after_kill = session_processes(ray_tmp)
        one_process = ["--no-ray", *common, "--set", "train.grad_accum=2"]
        other = main(["train", str(TINY_CONFIG), *one_process, "--set", "run_name=other", "--resume", str(ready)])
        source_written = (run_dir / ".universal").exists()
        resumed = main(["train", str(TINY_CONFIG), *one_process, "--set", "run_name=run", "--resume", "auto"])
        yield {"out": out, "left_after_kill": left_after_kill, "codes": (other, resumed),
               "source_written": source_written}
    finally:
        driver.kill()
        log.close()
        for pid in session_processes(ray_tmp):  # whatever a failed run left: this test's own session only
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(900)  # a driver with its own Ray and two runs after it, under a shared CPU
def test_a_killed_driver_loses_no_record_and_leaves_no_ray_process(killed_and_resumed):
    out = killed_and_resumed["out"]
    assert killed_and_resumed["codes"] == (0, 0)
    train_steps = [e["step"] for e in read_events(out / "run") if "loss" in e]
    assert train_steps == list(range(1, 9))  # steps 2-4 were only in checkpoint 4's records
    assert json.loads((out / "run" / "summary.json").read_text())["status"] == "completed"
    assert killed_and_resumed["left_after_kill"] == []


@pytest.mark.timeout(900)
def test_another_world_size_converts_into_the_resuming_runs_folder(killed_and_resumed):
    out = killed_and_resumed["out"]
    assert (out / "other" / ".universal" / "checkpoint_step_0000004" / checkpoints.MANIFEST).is_file()
    assert not killed_and_resumed["source_written"]  # the source run's folder was not written to
    # A new run from another's checkpoint: its records start after it (the source's are not its own).
    assert [e["step"] for e in read_events(out / "other") if "loss" in e] == [5, 6, 7, 8]


@pytest.mark.timeout(600)
def test_a_full_disk_is_one_line_and_leaves_no_torn_file(tmp_path):
    """The run folder on a 3 MB tmpfs: checkpoint 2 fits, checkpoint 4 does not."""
    mount, copy = tmp_path / "disk", tmp_path / "copy"
    mount.mkdir()
    command = [sys.executable, "-m", "sft_dist", "train", str(TINY_CONFIG), "--no-ray", *sets(
        f"output_dir={mount}", "run_name=run", "train.max_steps=6", "checkpoint.every_steps=2", *QUIET)]
    # The mount lives only in the new namespace: the run's files are copied out before it ends.
    script = (f"mount -t tmpfs -o size=3m tmpfs {mount} || exit 99; {' '.join(map(repr, command))}; "
              f"code=$?; cp -a {mount}/. {copy}/; exit $code")
    copy.mkdir()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    if done.returncode == 99 or "unshare failed" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount namespaces): {done.stderr.strip()[:200]}")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    run_dir = copy / "run"
    assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "no space left on device while saving checkpoint 4" in errors[0]
    assert checkpoint_steps(run_dir) == [2] and not (run_dir / "checkpoint_step_0000004").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "checkpoint 4" in summary["error"]
    assert [p.name for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size == 0] == []
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
