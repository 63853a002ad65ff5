"""The one launch path (sft_dist.driver.launch_path) as the commands see it: in process (--no-ray), a failed run
is debuggable, and its exit code comes from the one table (errors.Exit)."""

from __future__ import annotations

import json

from sft_dist.cli import main
from sft_dist.errors import Exit

from conftest import TINY_CONFIG


def test_no_ray_prints_the_failures_traceback_then_the_one_line_error_and_exits_1(tmp_path, capsys):
    """--no-ray is the mode for debugging: the traceback of the failure (down to the line that raised it)
    goes to stderr before the one-line error, and the run still ends as a failed run with its summary."""
    settings = ["run_name=r", "train.max_steps=3", "debug.fail_at_step=2", "debug.fail_rank=0", "eval.at_start=false",
                "eval.at_end=false", "eval.generate=null", "checkpoint.every_steps=null",
                "checkpoint.export_at_end=false"]
    code = main(["train", str(TINY_CONFIG), "--no-ray", "--set", f"output_dir={tmp_path}",
                 *[a for s in settings for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == Exit.FAILED == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == "error: training failed: rank 0: RuntimeError: debug.fail_at_step=2: injected failure on rank 0"
    traceback = err[err.index("Traceback (most recent call last)"):err.index("error: training failed")]
    assert 'faults.py", line' in traceback and "in maybe_fail" in traceback, traceback
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "injected failure" in summary["error"]
