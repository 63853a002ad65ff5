"""Preflight: a worker that cannot write the checkpoint storage, or runs other library versions, stops
the run before the model loads, with a message naming the worker."""

from __future__ import annotations

import socket
import subprocess
import sys

from sft_dist.worker import preflight

from conftest import REPO, TINY_CONFIG, subprocess_env

VERSIONS = {"torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.24.0", "peft": "0.21.2", "ray": "2.60.0"}


def report(rank: int, host: str, **versions: str) -> dict:
    return {"rank": rank, "host": host, "python": "3.11.7", "storage_error": None,
            "versions": {**VERSIONS, **versions}}


def test_matching_workers_have_no_problems():
    assert preflight.find_problems([report(0, "a"), report(1, "b")], [[], []], "/shared") == []


def test_a_version_mismatch_names_the_worker_and_both_versions():
    problems = preflight.find_problems([report(0, "a"), report(1, "b", deepspeed="0.18.0")], [[], []], "/shared")
    assert problems == ["rank 1 on b has deepspeed 0.18.0, rank 0 on a has 0.19.8"]


def test_unreadable_probes_name_the_reader_and_the_writer():
    problems = preflight.find_problems([report(0, "a"), report(1, "b")], [[], ["cannot read back rank 0's probe"]],
                                       "/local")
    assert problems == ["rank 1 on b cannot read back rank 0's probe from /local "
                        "(is it the same shared storage on every node?)"]


def test_unwritable_storage_stops_the_run_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "sft_dist", "train", str(TINY_CONFIG), "--no-ray", "--set", f"output_dir={tmp_path}",
         "--set", "run_name=r", "--set", f"ray.storage_path={blocker}/runs"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert f"preflight: rank 0 on {socket.gethostname()} cannot write to the checkpoint storage" in result.stderr
    assert "setup:" not in result.stdout  # the driver prints it once the model is built
