"""Per-step time breakdown on demand (`logging.timing`): where a step's wall time goes on rank 0.

The loop marks the end of each phase of a micro-batch with `lap(name)`; the time since the previous
mark is added to that phase. Phases: `data` (slicing rows, collating, copying to the device),
`forward` (forward and loss), `backward` (DeepSpeed's backward, which under ZeRO includes the gradient
reduce-scatter / all-reduce) and `optimizer` (DeepSpeed's step: clipping, the optimizer, the ZeRO
parameter all-gather). `comm` is the part of backward and optimizer spent in DeepSpeed's collectives,
as DeepSpeed's comms logger times them (a clock handed in by the loop: this module knows no DeepSpeed).
Switched off, `lap` returns at once, so the loop pays one call per phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimer:
    def __init__(self, enabled: bool = False, device: torch.device | None = None,
                 comm_clock: Callable[[], float] | None = None):
        self.enabled = enabled
        self.comm_clock = comm_clock  # seconds in collectives since its last call
        # Device work is asynchronous: without a sync a phase would be charged to whichever later phase
        # first waits for it. Syncing costs some overlap, which is why this is on demand only.
        self.sync = device is not None and device.type == "cuda"
        self.totals_s = dict.fromkeys(PHASES, 0.0)
        self.comm_total_s = 0.0
        self.steps = 0
        self.last_s = 0.0

    def start(self) -> None:
        """A step begins (the time between steps, e.g. logging, counts nowhere)."""
        if self.enabled:
            self.steps += 1
            self.last_s = self._now()
            if self.comm_clock is not None:
                self.comm_clock()  # collectives outside the step (setup, evaluation) count nowhere

    def lap(self, phase: str) -> None:
        """`phase` ended now: charge it the time since the previous mark."""
        if self.enabled:
            now = self._now()
            self.totals_s[phase] += now - self.last_s
            self.last_s = now
            if self.comm_clock is not None:
                self.comm_total_s += self.comm_clock()

    def metrics(self) -> dict[str, Any]:
        """Mean seconds per optimizer step of each phase since the last call (`time_data_s`, ...); resets."""
        if not self.enabled or not self.steps:
            return {}
        out = {f"time_{phase}_s": round(total / self.steps, 6) for phase, total in self.totals_s.items()}
        if self.comm_clock is not None:
            out["time_comm_s"] = round(self.comm_total_s / self.steps, 6)
        self.totals_s, self.comm_total_s, self.steps = dict.fromkeys(PHASES, 0.0), 0.0, 0
        return out

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()


OFF = StepTimer(False)  # the default for callers that do not time (benchmarks, tests)
