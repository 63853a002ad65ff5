"""Fault injection for tests and drills: one rank fails once, at one step (`debug.fail_at_step`), or
blocks inside one validation (`debug.hang_in_validation`); and a pace (`debug.step_sleep_s`, and
`debug.hold_while_file`).

"Once" is remembered by a marker file in the run's checkpoint storage, which every node reaches (the
run folder is the driver's, and a worker on another node may not see it), so the restarted worker group
trains on wherever its ranks land.
"""

from __future__ import annotations

import os
import threading
import time

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


HOLD_LIMIT_S = 300.0  # a hold file left behind delays a run, never hangs it


def pace(debug: DebugConfig) -> None:
    if debug.step_sleep_s:
        time.sleep(debug.step_sleep_s)
    deadline = time.monotonic() + HOLD_LIMIT_S
    while debug.hold_while_file and os.path.exists(debug.hold_while_file):
        if time.monotonic() > deadline:
            print(f"debug.hold_while_file: {debug.hold_while_file} still exists after {HOLD_LIMIT_S:g} s; "
                  "this step goes on", flush=True)
            return
        time.sleep(0.2)


def maybe_hang(debug: DebugConfig, rank: int, step: int) -> None:
    """Block this rank for good in the validation at `debug.hang_in_validation.step`, as a rank stuck on
    a dead filesystem or a lost peer would: the other ranks wait for it in the validation's all-reduce.
    Only eval.timeout_s's watchdog ends it (the config refuses the hang without one)."""
    hang = debug.hang_in_validation
    if hang is not None and (hang.step, hang.rank) == (step, rank):
        threading.Event().wait()  # never set
