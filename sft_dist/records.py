"""The run's state and records as types with one JSON form each: the loop state that checkpoints carry (the
manifest's and DeepSpeed's client state's keys, unchanged), and the records of `metrics.jsonl` and
`samples.jsonl` (training, validation, and events), so readers dispatch on a type and read fields instead
of telling dicts apart by the keys they hold."""

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


@dataclass(frozen=True)
class TrainRecord:
    """One logged training window: `metrics` in the worker's order (epoch, total_steps, loss, lr, ...)."""

    step: int
    metrics: dict[str, Any]

    @property
    def loss(self) -> float:
        return self.metrics["loss"]

    @property
    def lr(self) -> float | None:
        return self.metrics.get("lr")

    def phase_times(self, phases: tuple[str, ...]) -> dict[str, float] | None:
        """Mean seconds per step of each phase (logging.timing), None if the run did not time them."""
        if not all(f"time_{p}_s" in self.metrics for p in phases):
            return None
        return {p: self.metrics[f"time_{p}_s"] for p in phases}

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, **self.metrics}


@dataclass(frozen=True)
class EvalRecord:
    """One validation: `metrics` are its eval_* values (and eval_tokens), in the worker's order."""

    step: int
    metrics: dict[str, Any]

    @property
    def loss(self) -> float | None:
        return self.metrics.get("eval_loss")

    @property
    def headline(self) -> tuple[str, float]:
        """(name, value) of the metric the progress line shows: eval_loss, or a task's first metric."""
        name = "eval_loss" if "eval_loss" in self.metrics else next(k for k in self.metrics if k.startswith("eval_"))
        return name, self.metrics[name]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, **self.metrics}


@dataclass(frozen=True)
class EventRecord:
    """Anything else a run reports: `kind` is setup, preflight, shipping, resume, samples, warning, error
    or end; `fields` are the rest of its keys, in order."""

    step: int
    kind: str
    fields: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "event": self.kind, **self.fields}


Record = TrainRecord | EvalRecord | EventRecord


def record_from_json(saved: dict[str, Any]) -> Record:
    """The one place that tells records apart by their keys: a record written by any version of the
    workers (metrics.jsonl, samples.jsonl, a checkpoint's records.jsonl) as its type."""
    rest = {k: v for k, v in saved.items() if k not in ("step", "event")}
    if "event" in saved:
        return EventRecord(saved["step"], saved["event"], rest)
    if "loss" in saved:
        return TrainRecord(saved["step"], rest)
    if any(k.startswith("eval_") for k in saved):
        return EvalRecord(saved["step"], rest)
    raise ValueError(f"a record that is neither training, validation nor an event: keys {sorted(saved)}")
