"""`sft-dist tune`: Ray Tune over config keys, each trial a real sft_dist run on Ray Train workers,
ASHA stopping the trials that fall behind at the coordinated validation's metric; Optuna's searcher;
an interrupted search resumed from Tune's saved state."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from sft_dist.cli import main

from conftest import TINY_CONFIG, read_events

# A search runs several full trials, each a distributed run: the module's own limit.
pytestmark = pytest.mark.timeout(900)

RATES = (1.0e-2, 3.0e-3, 1.0e-5, 1.0e-6)


def write_space(tmp_path: Path, **changes) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "metric": "eval_loss", "mode": "min", "max_concurrent_trials": 2, "num_samples": 4, "searcher": "optuna",
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "fixed": {"eval.every_steps": 2, "eval.at_start": False, "eval.generate": None, "ray.num_workers": 1,
                  "train.max_steps": 8},
        "params": {"train.lr": {"loguniform": [1.0e-6, 1.0e-2]}},
        # Optuna asks for these first, in order: the two good rates set the bar at the first rung, and the
        # two rates too small to learn anything in 8 steps fall below it there
        "start_with": [{"train.lr": lr} for lr in RATES],
        **changes,
    }))
    return space


def interrupt_when(ready) -> threading.Thread:
    """Ctrl+C to this process once `ready()`: Tune's handler saves the search's state and stops it."""
    def watch():
        while not ready():
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def read_events_of(run: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run) if e.get("event") == kind]


def trial_rows(out: str) -> list[str]:
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trial ") and "validations" in line)
    return [line for line in lines[header + 1:] if line and not line.startswith("best:")]


def test_an_interrupted_optuna_search_resumes_stops_a_trial_early_and_reports_the_best(ray_cluster, tmp_path, capsys):
    args = ["tune", str(TINY_CONFIG), "--space", str(write_space(tmp_path)), "--set", f"output_dir={tmp_path}"]
    # once the first two trials' workers run (not while they start: Ray Train registers a worker group's
    # placement group for cleanup only once it has started, and a trial killed before leaks its CPUs)
    interrupt_when(lambda: sum('"preflight"' in p.read_text() for p in tmp_path.glob("trial-*/metrics.jsonl")) >= 2)
    assert main(args) == 1
    err = capsys.readouterr().err
    finished = re.search(r"the search was interrupted \((\d) of 4 trials finished", err)
    assert finished and int(finished[1]) < 4, err
    assert f"--set output_dir={tmp_path} --resume" in err
    assert main(args) == 2 and "add --resume to continue it" in capsys.readouterr().err  # never two searches in one

    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    rows = trial_rows(out)
    assert len(rows) == 4 and all(("done" in r) != ("stopped early" in r) for r in rows), out
    assert any("stopped early" in r for r in rows), out
    assert sorted(float(r.split()[1]) for r in rows) == sorted(RATES)  # no trial added by the restart
    # the two trials cut off started over in clean run folders
    assert [len(read_events_of(run, "setup")) for run in sorted(tmp_path.glob("trial-*"))] == [1, 1, 1, 1]
    # a trial that ran to its end finished its run (Tune stops it at its last rung only after)
    assert all((tmp_path / f"trial-{r.split()[0]}" / "summary.json").exists() for r in rows if "done" in r)
    best = next(line for line in out.splitlines() if line.startswith("best: eval_loss"))
    assert "train.lr=0.003" in best or "train.lr=0.01" in best

    # resuming a finished search runs nothing again and reports the same table
    logs = {p: p.read_text() for p in tmp_path.glob("trial-*/metrics.jsonl")}
    assert main([*args, "--resume"]) == 0
    assert sorted(trial_rows(capsys.readouterr().out)) == sorted(rows)  # (in the order Tune restores them)
    assert {p: p.read_text() for p in tmp_path.glob("trial-*/metrics.jsonl")} == logs


def test_optuna_requested_but_not_installed_is_a_setup_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError, as when not installed
    space = write_space(tmp_path)
    assert main(["tune", str(TINY_CONFIG), "--space", str(space), "--set", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {space}: searcher: searcher optuna is not installed: pip install 'sft_dist[tune]'")


@pytest.mark.parametrize("changes, key, message", [
    ({"params": {"train.lr": {"grid": [1e-3, 1e-2]}}, "start_with": []}, "train.lr", "grid needs searcher: random"),
    ({"start_with": [{"train.weight_decay": 0.1}]}, "start_with.0", "give a value for each key of params"),
    ({"searcher": "random", "params": {"train.lr": {"grid": [1e-3]}}}, "start_with",
     "start_with needs a space without grid"),
])
def test_a_bad_search_space_names_its_key(tmp_path, capsys, changes, key, message):
    space = write_space(tmp_path, **changes)
    assert main(["tune", str(TINY_CONFIG), "--space", str(space), "--set", f"output_dir={tmp_path}"]) == 2
    assert f"{space}: {key}: {message}" in capsys.readouterr().err
