"""Stopping together: a reason to stop that only one rank sees (its own early-stopping or divergence
view, a SIGTERM that reaches rank 0 alone, a preemption notice that reaches one rank first) stops every
rank at the same step. On 2 real gloo processes fed different reasons, and on a real Ray run."""

from __future__ import annotations

import json

from sft_dist import checkpoints

from conftest import read_events
from fixtures.ranks import agree_on_stops, run_ranks

# (rank 0's, rank 1's) (reason from its own view, what its context's interruption() says)
CASES = {
    "early stopping seen by rank 1 alone": (((None, None), ("early_stopping", None)), "early_stopping"),
    "divergence seen by rank 0 alone": ((("diverged", None), (None, None)), "diverged"),
    "SIGTERM seen by rank 0 alone": (((None, "stop"), (None, None)), "stop"),
    "preemption notice on rank 1 first": (((None, None), (None, "preempted")), "preempted"),
    # One reason each: the order of train.agreed_stop (non_finite, stop, preempted, early_stopping, diverged).
    "a stop outranks early stopping": (((None, "stop"), ("early_stopping", None)), "stop"),
    "a preemption outranks divergence": ((("diverged", None), (None, "preempted")), "preempted"),
    "early stopping outranks divergence": ((("diverged", None), ("early_stopping", None)), "early_stopping"),
    "a non-finite step outranks a stop": ((("non_finite", None), (None, "stop")), "non_finite"),
    "nothing": (((None, None), (None, None)), None),
}


def test_a_reason_one_rank_sees_is_every_ranks_answer():
    cases = [seen for seen, _ in CASES.values()]
    answers = run_ranks(agree_on_stops, 2, cases)
    expected = [answer for _, answer in CASES.values()]
    assert dict(zip(CASES, answers[0])) == dict(zip(CASES, expected))
    assert answers[1] == answers[0]


def test_a_stop_only_rank_0_sees_stops_every_rank_at_the_same_step(stopped_ray_run):
    """Had rank 1 trained on, rank 0 would have waited alone in the stop's checkpoint (a collective), or
    the run would have failed: instead both ranks saved that step's shards and ended."""
    run = stopped_ray_run.run_dir
    assert stopped_ray_run.exit_code == 143  # 128 + SIGTERM
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"]) == ("stopped", "stop")
    stopped_at = summary["steps"]
    assert stopped_at >= 2 and [e["step"] for e in read_events(run) if "loss" in e] == list(range(1, stopped_at + 1))
    folder = run / checkpoints.folder_name(stopped_at)
    assert checkpoints.problem(folder) is None and checkpoints.read_manifest(folder)["world_size"] == 2
    assert sorted(run.glob("checkpoint_step_*")) == [folder]  # no periodic checkpoints: the stop's own
    assert f"stopped at step {stopped_at} with a checkpoint" in stopped_ray_run.out
