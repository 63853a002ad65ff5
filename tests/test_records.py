"""The loop state's one JSON form is the one checkpoints have always carried."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from sft_dist.records import LoopState

# The manifest of checkpoint_step_0000001 of `sft-dist train configs/tiny-cpu.yaml --no-ray --set
# train.max_steps=2 --set checkpoint.every_steps=1`, as written before the loop state had a type.
MANIFEST = json.loads((Path(__file__).parent / "fixtures" / "manifest_step1.json").read_text())


def test_the_loop_state_reads_a_saved_manifest_and_writes_its_keys_back_in_order():
    state = LoopState.from_json(MANIFEST)
    assert (state.step, state.examples_seen, state.epoch) == (1, 4, 0)
    saved = {k: v for k, v in MANIFEST.items() if k not in ("world_size", "files", "metrics")}
    assert json.dumps(state.to_json()) == json.dumps(saved)  # same keys, same order, same values


def test_a_checkpoint_without_newer_keys_still_reads():
    state = LoopState.from_json({"step": 7, "examples_seen": 28})
    assert (state.step, state.best, state.fingerprint) == (7, None, None)
    assert LoopState.from_json({}).step == 0  # a fresh start


# metrics.jsonl, samples.jsonl and checkpoint_step_0000002/records.jsonl of `sft-dist train configs/tiny-cpu.yaml
# --no-ray --set train.max_steps=4 --set checkpoint.every_steps=2 --set eval.every_steps=2 --set
# logging.timing=true`, and metrics.jsonl of its `--resume .../checkpoint_step_0000002`, written before records
# had types: the oracle of their one JSON form.
RUN = Path(__file__).parent / "fixtures" / "run"
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "records.jsonl", "resumed_metrics.jsonl")


def run_lines(name: str) -> list[str]:
    return (RUN / name).read_text().splitlines()


def old_kind(line: dict) -> str:
    """How the driver told records apart before they had types."""
    return line.get("event") or ("train" if "loss" in line else "eval")


def test_every_record_a_run_wrote_reads_as_its_type_and_writes_back_byte_for_byte():
    from sft_dist.records import EvalRecord, EventRecord, TrainRecord, record_from_json

    kinds = set()
    for name in RUN_FILES:
        for line in run_lines(name):
            record = record_from_json(json.loads(line))
            assert json.dumps(record.to_json()) == line  # same keys, same order, same values
            kind = record.kind if isinstance(record, EventRecord) else {TrainRecord: "train",
                                                                       EvalRecord: "eval"}[type(record)]
            assert kind == old_kind(json.loads(line))
            kinds.add(kind)
    assert kinds == {"preflight", "setup", "train", "eval", "samples", "end", "resume"}


def test_events_no_tiny_run_writes_keep_their_form_and_a_stray_record_is_refused():
    import pytest

    from sft_dist.records import EventRecord, record_from_json

    for line in ({"step": 0, "event": "shipping", "ranks": [{"rank": 0, "shipped": 2}]},
                 {"step": 3, "event": "warning", "message": "the model looks dead"},
                 {"step": 3, "event": "error", "message": "validation timed out"}):
        record = record_from_json(line)
        assert isinstance(record, EventRecord) and json.dumps(record.to_json()) == json.dumps(line)
    with pytest.raises(ValueError, match="'grad_norm'"):
        record_from_json({"step": 1, "grad_norm": 2.0})


def test_the_recorder_writes_a_run_s_files_as_the_workers_sent_them(tmp_path):
    from sft_dist.driver.metrics import RunRecorder

    recorder = RunRecorder(tmp_path, out=io.StringIO())
    interleaved = sorted((json.loads(line) for name in ("metrics.jsonl", "samples.jsonl") for line in run_lines(name)),
                         key=lambda e: e["step"])  # stable: each file keeps its own order
    for event in interleaved:
        recorder.record(event)
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (tmp_path / name).read_text() == (RUN / name).read_text()
    summary = recorder.summary({})
    assert summary["eval_last"] == json.loads(run_lines("metrics.jsonl")[-2])
    assert (summary["steps"], summary["best"]["step"], summary["final"]["loss"]) == (4, 4, 5.384484030983665)


def test_an_existing_run_folder_still_plots(tmp_path):
    from sft_dist.driver.plots import read_metrics, write_loss_plot

    shutil.copy(RUN / "metrics.jsonl", tmp_path / "metrics.jsonl")
    train, evals = read_metrics(tmp_path)
    assert [r.step for r in train] == [1, 2, 3, 4] and [r.step for r in evals] == [0, 2, 4]
    assert write_loss_plot(tmp_path).stat().st_size > 0


def test_the_manifest_reads_a_saved_one_and_writes_it_back_byte_for_byte():
    from sft_dist.checkpoints import UNSCORED, Manifest

    manifest = Manifest.from_json(MANIFEST)
    assert (manifest.step, manifest.world_size, manifest.score, manifest.source_files) == (1, 1, UNSCORED, None)
    assert manifest.loop == LoopState.from_json(MANIFEST) and manifest.files == MANIFEST["files"]
    assert json.dumps(manifest.to_json(), indent=1) == json.dumps(MANIFEST, indent=1)
    # A universal copy's manifest, as convert_to_universal wrote it before manifests had a type: the source's
    # keys with its own files, and the source's files last.
    copy = manifest.universal({"latest": 5})
    assert json.dumps(copy.to_json()) == json.dumps({**MANIFEST, "files": {"latest": 5},
                                                     "source_files": MANIFEST["files"]})
    assert Manifest.from_json(copy.to_json()) == copy


def test_a_validation_without_a_loss_is_shown_and_kept(tmp_path):
    """A detector validates with eval_map and no eval_loss: still a validation (the old key test dropped it)."""
    from sft_dist.driver.metrics import RunRecorder

    out = io.StringIO()
    recorder = RunRecorder(tmp_path, out=out)
    for step, value in ((0, 0.125), (2, 0.5)):
        recorder.record({"step": step, "eval_map": value, "eval_images": 3})
    assert "eval  step 2: eval_map 0.5000" in out.getvalue()
    assert recorder.summary({})["eval_last"] == {"step": 2, "eval_map": 0.5, "eval_images": 3}
    assert "held-out eval_map: 0.1250 (step 0) -> 0.5000 (step 2)" in recorder.before_after()


def test_the_validation_line_shows_each_tasks_own_metric(tmp_path):
    """Speech recognition's word error rate and regression's errors are on the console line, as accuracy is."""
    from sft_dist.driver.metrics import RunRecorder

    out = io.StringIO()
    recorder = RunRecorder(tmp_path, out=out)
    recorder.record({"step": 0, "eval_loss": 5.9, "eval_token_acc": 0.0, "eval_wer": 1.0, "eval_clips": 30})
    recorder.record({"step": 1, "eval_loss": 0.5, "eval_mse": 0.25, "eval_mae": 0.4})
    assert "eval  step 0: eval_loss 5.9000 token_acc 0.000 wer 1.000" in out.getvalue()
    assert "eval  step 1: eval_loss 0.5000 mse 0.250 mae 0.400" in out.getvalue()
