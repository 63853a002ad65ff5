"""The loop state's one JSON form is the one checkpoints have always carried."""

from __future__ import annotations

import json
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
