"""The run state that checkpoints carry, as a type with one JSON form (the manifest's and DeepSpeed's client
state's keys, unchanged), so the loop reads fields instead of a dict's keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class LoopState:
    """Where a run is: saved with every checkpoint, restored on a resume (a fresh start is step 0)."""

    step: int = 0
    examples_seen: int = 0
    seed: int | None = None
    epoch: int = 0
    best: dict[str, Any] | None = None  # BestTracker.state()
    fingerprint: dict[str, Any] | None = None  # sft_dist.fingerprint of the inputs, for a resume's checks
    config: dict[str, Any] | None = None  # the run's RunConfig as JSON

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> LoopState:
        """From a checkpoint's manifest (which holds more keys) or loop state; keys an older checkpoint
        lacks keep their defaults."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
