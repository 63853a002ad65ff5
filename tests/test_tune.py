"""`sft-dist tune`: Ray Tune over config keys, each trial a real sft_dist run on Ray Train workers,
ASHA stopping the trials that fall behind at the coordinated validation's metric."""

from __future__ import annotations

import pytest
import yaml

from sft_dist.cli import main

from conftest import TINY_CONFIG


def test_a_small_search_stops_a_trial_early_and_reports_the_best(ray_cluster, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "eval_loss", "mode": "min", "max_concurrent_trials": 2,
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "fixed": {"eval.every_steps": 2, "eval.at_start": False, "eval.generate": None, "ray.num_workers": 1,
                  "train.max_steps": 8},
        # Tune runs grid points in order: the two good rates set the bar at the first rung, and the two
        # rates too small to learn anything in 8 steps fall below it there
        "params": {"train.lr": {"grid": [1.0e-2, 3.0e-3, 1.0e-5, 1.0e-6]}},
    }))
    assert main(["tune", str(TINY_CONFIG), "--space", str(space), "--set", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trial ") and "validations" in line)
    rows = lines[header + 1:header + 5]
    assert len(rows) == 4 and all(("done" in r) != ("stopped early" in r) for r in rows)
    assert any("stopped early" in r for r in rows), "\n".join(lines[header:header + 5])
    best = next(line for line in out.splitlines() if line.startswith("best: eval_loss"))
    assert "train.lr=0.003" in best or "train.lr=0.01" in best
