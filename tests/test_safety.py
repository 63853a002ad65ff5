"""Loading a checkpoint cannot run code, on every path that loads one: export, `--resume PATH`, `eval`,
the universal conversion for another world size, and the automatic recovery of Ray workers.

The payload is a real one: a `__reduce__` object added to `mp_rank_00_model_states.pt` (manifest sizes
rewritten to match, as an attacker would), which touches a marker file when unpickled. The fixture
first shows it does so under a plain `torch.load(weights_only=False)` (what DeepSpeed calls) in a
process that nothing guards; every other test shows the marker is never made.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from sft_dist.cli import main

from conftest import TINY_CONFIG, train_tiny

MODEL_STATES = "state/mp_rank_00_model_states.pt"
QUICK = ("train.max_steps=2", "checkpoint.every_steps=2", "eval.at_start=false", "eval.at_end=false",
         "eval.generate=null")


class Payload:
    """Unpickled, it runs a shell command: what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(folder: Path, marker: Path) -> Path:
    """Plant the payload in a copy's model-states file and make the manifest agree with its new size."""
    path = folder / MODEL_STATES
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["extra_state"] = Payload(marker)
    torch.save(state, path)
    manifest = json.loads((folder / "sft_dist_checkpoint.json").read_text())
    manifest["files"][MODEL_STATES] = path.stat().st_size
    (folder / "sft_dist_checkpoint.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """A real 1-process checkpoint (ZeRO-2) to plant payloads in."""
    return train_tiny(tmp_path_factory.mktemp("safety"), *QUICK, extra_args=("--no-ray",))


@pytest.fixture
def planted(clean_run, tmp_path) -> tuple[Path, Path]:
    """(a poisoned copy of the run's checkpoint, the marker its payload would create)."""
    copy = tmp_path / "src" / "checkpoint_step_0000002"
    shutil.copytree(clean_run / "checkpoint_step_0000002", copy)
    marker = tmp_path / "PAYLOAD_RAN"
    return poison(copy, marker), marker


def test_the_payload_is_real_where_nothing_guards_the_load(planted, monkeypatch):
    folder, marker = planted
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)  # as in a process nothing guards
    torch.load(folder / MODEL_STATES, weights_only=False)
    assert marker.exists()  # else the tests below would pass for a payload that never worked


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_export_refuses_the_payload_in_one_line(planted, tmp_path, capsys):
    folder, marker = planted
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert str(folder / MODEL_STATES) in line and "posix.system" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resume_and_eval_refuse_the_payload_before_anything_starts(planted, tmp_path, capsys, monkeypatch):
    folder, marker = planted
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing may connect to Ray before this fails
    common = ["--set", f"output_dir={tmp_path / 'runs'}", *[a for o in QUICK for a in ("--set", o)]]
    assert main(["train", str(TINY_CONFIG), "--resume", str(folder), *common]) == 2
    assert str(folder / MODEL_STATES) in one_error_line(capsys)
    assert main(["eval", str(TINY_CONFIG), "--checkpoint", str(folder), *common]) == 2
    assert str(folder / MODEL_STATES) in one_error_line(capsys)
    assert not marker.exists()


def test_universal_conversion_refuses_the_payload_and_so_does_deepspeed_itself(planted, tmp_path):
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from sft_dist import safe_loading
    from sft_dist.errors import UserError
    from sft_dist.worker import checkpoint, runtime

    folder, marker = planted
    ctx = runtime.LocalRunContext(0, 1, 0, torch.device("cpu"), lambda e: None, tmp_path, threading.Event())
    with pytest.raises(UserError, match="posix.system"):
        checkpoint.universal_copy(folder, ctx, tmp_path / "resuming-run")
    # Past the scan, DeepSpeed's own loads (weights_only=False) are weights-only loads in this process:
    # the conversion, and the load a resume makes, fail rather than unpickle the payload.
    safe_loading.enforce()
    args = argparse.Namespace(input_folder=str(folder / "state"), output_folder=str(tmp_path / "u"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with pytest.raises(pickle.UnpicklingError):
        ds_to_universal(args)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(folder / MODEL_STATES, weights_only=False)
    assert not marker.exists()


def test_a_checkpoints_trust_remote_code_needs_the_users_word(clean_run, tmp_path, capsys):
    copy = tmp_path / "checkpoint_step_0000002"
    shutil.copytree(clean_run / "checkpoint_step_0000002", copy)
    manifest = json.loads((copy / "sft_dist_checkpoint.json").read_text())
    manifest["config"]["model"]["trust_remote_code"] = True
    (copy / "sft_dist_checkpoint.json").write_text(json.dumps(manifest))
    assert main(["export", str(copy), "--out", str(tmp_path / "out")]) == 2
    assert "trust_remote_code" in one_error_line(capsys) and not (tmp_path / "out").exists()
    assert main(["export", str(copy), "--out", str(tmp_path / "out"), "--trust-remote-code"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.timeout(600)
def test_a_restarted_ray_worker_refuses_a_payload_planted_in_the_runs_own_checkpoint(ray_cluster, tmp_path, capsys):
    """Automatic recovery: rank 0 fails at step 3; before Ray's restarted workers load the run's
    checkpoint of step 2, the payload is planted in it. The run fails naming the file."""
    run_dir, marker = tmp_path / "run", tmp_path / "PAYLOAD_RAN"
    ready = run_dir / "checkpoint_step_0000002"
    planted = threading.Event()

    def plant_when_saved() -> None:
        from sft_dist import checkpoints

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not planted.is_set():
            if ready.is_dir() and checkpoints.problem(ready) is None:  # every rank's files complete
                poison(ready, marker)
                planted.set()
            time.sleep(0.05)

    planter = threading.Thread(target=plant_when_saved, daemon=True)
    planter.start()
    code = main(["train", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", "run_name=run",
                 *[a for o in ("train.max_steps=4", "checkpoint.every_steps=2", "eval.at_start=false",
                               "eval.at_end=false", "eval.generate=null", "debug.fail_at_step=3",
                               "ray.max_failures=1") for a in ("--set", o)]])
    planter.join(timeout=5)
    line = one_error_line(capsys)
    assert planted.is_set() and code == 1
    assert str(ready.resolve() / MODEL_STATES) in line and "posix.system" in line, line
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert not marker.exists()
