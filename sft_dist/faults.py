"""Fault injection for tests and drills (`debug.fail_at_step`): one rank fails once, at one step.

"Once" is remembered by a marker file in the run's checkpoint storage, which every node reaches (the
run folder is the driver's, and a worker on another node may not see it), so the restarted worker group
trains on wherever its ranks land.
"""

from __future__ import annotations

import os

from sft_dist.config import DebugConfig
from sft_dist.storage import Location


def maybe_fail(debug: DebugConfig, run_storage: Location, rank: int, step: int) -> None:
    if debug.fail_at_step != step or rank != debug.fail_rank:
        return
    marker = run_storage.join(f".debug-failed-at-step-{step}")
    if marker.exists():
        return
    marker.write_text("")
    if debug.fail_mode == "exit":
        os._exit(17)  # a hard process death: no exception, no cleanup, as when a node dies
    raise RuntimeError(f"debug.fail_at_step={step}: injected failure on rank {rank}")
