"""Fault injection for tests and drills (`debug.fail_at_step`): one rank fails once, at one step.

"Once" is remembered by a marker file in the run folder, so the restarted worker group trains on.
"""

from __future__ import annotations

import os
from pathlib import Path

from sft_dist.config import DebugConfig


def maybe_fail(debug: DebugConfig, run_dir: Path, rank: int, step: int) -> None:
    if debug.fail_at_step != step or rank != debug.fail_rank:
        return
    marker = run_dir / f".debug-failed-at-step-{step}"
    if marker.exists():
        return
    marker.touch()
    if debug.fail_mode == "exit":
        os._exit(17)  # a hard process death: no exception, no cleanup, as when a node dies
    raise RuntimeError(f"debug.fail_at_step={step}: injected failure on rank {rank}")
