"""Coordinated validation: early stopping agreed by all ranks, the best checkpoint, `sft-dist eval`,
validation that leaves training alone, generation under ZeRO-3, and the limits (timeout, empty set).
Real Ray workers and DeepSpeed engines on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sft_dist.cli import main
from sft_dist.worker.evaluate import BestTracker

from conftest import REPO, TINY_CONFIG, eval_losses, eval_set_loss, read_events, train_losses, train_tiny


def uneven_eval_set(folder: Path) -> Path:
    """3 held-out conversations, sharded rank 0: examples 0 and 2 (three answers each), rank 1: example 1
    (one answer): the ranks hold very different numbers of supervised tokens, so a mean of per-rank
    means, or a rank's own view, differs from the token-weighted mean over the whole set."""
    rows = [json.loads(line) for line in (REPO / "configs" / "data" / "dates" / "eval.jsonl").read_text().splitlines()]

    def turns(group: list[dict]) -> dict:
        return {"messages": [m for row in group for m in row["messages"]]}

    path = folder / "uneven-eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (turns(rows[0:3]), turns(rows[3:4]), turns(rows[4:7]))))
    return path


@pytest.fixture(scope="module")
def early_stopped_run(ray_cluster, tmp_path_factory):
    """Validation every 3 steps; an improvement must exceed 10 nats to count, so patience 2 runs out at
    step 6 (step 0 is the first validation, steps 3 and 6 fail to improve enough)."""
    root = tmp_path_factory.mktemp("early")
    return train_tiny(root, "train.max_steps=12", "eval.every_steps=3", f"data.eval={uneven_eval_set(root)}",
                      "eval.early_stopping.patience=2", "eval.early_stopping.min_delta=10",
                      "checkpoint.every_steps=3", "checkpoint.keep=1")


def test_validation_on_uneven_shards_is_the_token_weighted_mean_over_the_whole_set(early_stopped_run):
    """Step 0 is the pretrained model itself: the single-process oracle needs no checkpoint."""
    base = AutoModelForCausalLM.from_pretrained(REPO / "configs" / "models" / "tiny-llama").eval()
    assert eval_losses(early_stopped_run)[0] == pytest.approx(eval_set_loss(base, early_stopped_run.parent), rel=1e-5)
    # The stop is the one the logged (all-reduced) metrics call for, replayed in one process.
    tracker = BestTracker("eval_loss", "min", patience=2, min_delta=10)
    stop = next(e["step"] for e in read_events(early_stopped_run) if "eval_loss" in e
                and (tracker.update(e, e["step"]) or True) and tracker.should_stop())
    assert json.loads((early_stopped_run / "summary.json").read_text())["steps"] == stop


def test_early_stopping_stops_every_rank_at_the_same_step_and_names_the_best_checkpoint(early_stopped_run):
    summary = json.loads((early_stopped_run / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"], summary["steps"]) == ("completed", "early_stopping", 6)
    assert [e["step"] for e in read_events(early_stopped_run) if "loss" in e] == list(range(1, 7))
    losses = {e["step"]: e["eval_loss"] for e in read_events(early_stopped_run) if "eval_loss" in e}
    assert list(losses) == [0, 3, 6]
    best = summary["best_checkpoint"]
    assert best["step"] == 6 and best["eval_loss"] == pytest.approx(min(losses.values()))
    assert summary["best"] == {"metric": "eval_loss", "value": pytest.approx(losses[6]), "step": 6}
    # keep=1: Ray kept the best (which is also the latest) and deleted the step-3 checkpoint
    assert sorted(p.name for p in early_stopped_run.glob("checkpoint_step_*")) == ["checkpoint_step_0000006"]


def test_validation_leaves_the_training_trajectory_alone(early_stopped_run, zero2_run):
    """The same config validated (and generating) every 3 steps follows the run validated only at the ends."""
    assert train_losses(early_stopped_run) == pytest.approx(train_losses(zero2_run)[:6], rel=1e-6)


def test_eval_command_reproduces_the_logged_eval_loss(early_stopped_run, tmp_path, capsys):
    code = main(["eval", str(TINY_CONFIG), "--checkpoint", str(early_stopped_run),
                 "--set", f"output_dir={tmp_path}",
                 "--set", f"data.eval={early_stopped_run.parent / 'uneven-eval.jsonl'}"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["checkpoint"].endswith("checkpoint_step_0000006") and result["step"] == 6
    assert result["eval_loss"] == pytest.approx(eval_losses(early_stopped_run)[-1], rel=1e-6)


def test_generation_under_zero3_completes_on_every_rank_and_writes_samples(zero3_run):
    samples = [json.loads(line) for line in (zero3_run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 12]  # at the start and at the end
    assert all(len(s["samples"]) == 2 and all(x["answer"] is not None for x in s["samples"]) for s in samples)
    ends = [e for e in read_events(zero3_run) if "eval_exact_match" in e]
    assert len(ends) == 2


@pytest.mark.timeout(240)  # ~40 s measured; without the watchdog the run would hang until this limit
def test_a_validation_that_hangs_on_one_rank_fails_the_run_naming_phase_step_and_rank(ray_cluster, tmp_path, capfd):
    """Rank 0 blocks in the validation at step 1 (debug.hang_in_validation) while rank 1 finishes its share
    and waits for it in the all-reduce: each rank's watchdog ends its process at eval.timeout_s (rank 1's
    first: it started its clock a moment earlier, while rank 0 sent the step's metrics), and the run fails
    (exit 1) naming the phase, step and rank instead of leaving anyone waiting."""
    code = main(["train", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", "run_name=hung",
                 *[a for o in ("train.max_steps=2", "eval.at_start=false", "eval.every_steps=1", "eval.generate=null",
                               "eval.timeout_s=3", "debug.hang_in_validation={step: 1, rank: 0}")
                   for a in ("--set", o)]])
    assert code == 1
    err = capfd.readouterr().err
    summary = json.loads((tmp_path / "hung" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 1
    assert summary["error"] == "validation at step 1 on rank 0 ran past eval.timeout_s=3s", summary["error"]
    assert "error: training failed: validation at step 1 on rank 0 ran past eval.timeout_s=3s" in err
    assert not [e for e in read_events(tmp_path / "hung") if "eval_loss" in e]  # no validation completed


def test_an_empty_validation_set_is_refused_before_training(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["train", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", f"data.eval={empty}"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no rows" in err


@pytest.mark.parametrize("rule, pattern, answer, expected, hit", [
    ("exact", None, "2001-02-03", "2001-02-03", True),
    ("exact", None, "2001-02-03.", "2001-02-03", False),
    ("contains", None, "It is 2001-02-03.", "2001-02-03", True),
    ("regex", r"(\d{4}-\d\d-\d\d)", "Answer: 2001-02-03!", "2001-02-03", True),
    ("regex", None, "2001-02-03", r"\d{4}-\d\d-\d\d", True),
    ("json", None, '{"b": 2, "a": 1}', '{"a": 1, "b": 2}', True),
    ("json", None, '{"a": 1', '{"a": 1}', False),
])
def test_generation_match_rules(rule, pattern, answer, expected, hit):
    from sft_dist.config import GenerateConfig
    from sft_dist.worker.evaluate import matches

    assert matches(answer, expected, GenerateConfig(match=rule, pattern=pattern)) is hit


def test_best_tracker_counts_patience_from_the_last_real_improvement():
    from sft_dist.worker.evaluate import BestTracker

    tracker = BestTracker("eval_loss", "min", patience=2, min_delta=0.1)
    for step, loss in [(0, 3.0), (1, 2.5), (2, 2.45), (3, 2.6)]:
        tracker.update({"eval_loss": loss}, step)
    assert (tracker.best, tracker.best_step, tracker.should_stop()) == (2.45, 2, True)
    resumed = BestTracker("eval_loss", "min", patience=2, min_delta=0.1, **tracker.state())
    assert resumed == tracker
