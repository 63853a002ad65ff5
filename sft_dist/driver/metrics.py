"""The driver's record of a run: rank 0's events into `metrics.jsonl` (and generated samples into
`samples.jsonl`), the configured sinks (sft_dist.driver.sinks), the progress display (sft_dist.driver.progress),
and what `summary.json` needs at the end.

One record per step, whatever happened to the driver: a resume brings the records its checkpoint
carries (checkpoints.RECORDS) and fills in those this file lacks (a driver killed while the workers ran
on), after dropping the records of steps trained again. A record that cannot be written (a full disk)
is left out whole and reported at the end, never half-written and never a crash of the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sft_dist.atomic_files import append_line, read_jsonl, write_text
from sft_dist.driver import progress
from sft_dist.records import EvalRecord, EventRecord, Record, TrainRecord, record_from_json

if TYPE_CHECKING:
    from sft_dist.driver.sinks import Sink

from sft_dist.worker import preflight

# Validation metrics on the console line, in this order (those a record has).
EVAL_SHOWN = ("eval_ppl", "eval_token_acc", "eval_exact_match", "eval_wer", "eval_accuracy", "eval_macro_f1",
              "eval_entity_precision", "eval_entity_recall", "eval_entity_f1", "eval_mse", "eval_mae", "eval_map",
              "eval_map_50", "eval_mean_iou", "eval_pixel_accuracy")
TASK_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_entity_f1", "eval_wer")

class RunRecorder:
    def __init__(self, run_dir: Path, out: TextIO | None = None, sinks: list[Sink] = ()):
        self.run_dir, self.out = run_dir, out  # None: whatever sys.stdout is when printing
        self.display = progress.for_stream(out)  # a live line on a terminal, plain lines otherwise
        self.sinks = list(sinks)  # TensorBoard, MLflow, W&B as configured (sft_dist.driver.sinks)
        self.started_s = time.time()
        self.setup: dict[str, Any] = {}  # the setup event's fields
        self.last_train: TrainRecord | None = None
        self.evals: list[EvalRecord] = []
        self.samples: list[EventRecord] = []
        self.end: dict[str, Any] = {}  # the end event's fields and step
        self.errors: list[str] = []  # what workers reported before failing (e.g. a validation timeout)
        self.warnings: list[str] = []  # what the user should know of a run that went on (a dead model)
        self.write_error: str | None = None  # the first record that could not be written, and why

    def record(self, received: dict[str, Any]) -> Record:
        """A worker's record as it arrives (JSON), written, shown and kept; returns it as its type."""
        record = record_from_json(received)
        if isinstance(record, EventRecord) and record.kind == "resume":
            record = self._resumed(record)
        is_samples = isinstance(record, EventRecord) and record.kind == "samples"
        self._append("samples.jsonl" if is_samples else "metrics.jsonl", record)
        for sink in self.sinks:
            sink.write(record)
        match record:
            case EventRecord():
                self._event(record)
            case EvalRecord(step=step, metrics=metrics):
                self.evals.append(record)
                name, value = record.headline
                shown = [f"{k.removeprefix('eval_')} {metrics[k]:.{2 if k == 'eval_ppl' else 3}f}"
                         for k in EVAL_SHOWN if k in metrics and k != name]
                self.display.evaluated(record, f"eval  step {step}: {name} {value:.4f} " + " ".join(shown))
            case TrainRecord():
                self.last_train = record
                self.display.train(record)
        return record

    def _event(self, record: EventRecord) -> None:
        kind, event = record.kind, record.fields
        if kind == "setup":
            self.setup = event
            trainable = event.get("trainable_params", event["param_elements_total"])
            self._print(f"setup: {event['world_size']} workers, ZeRO-{event['zero_stage']}, "
                        f"{event['param_elements_total']:,} parameters ({trainable:,} trainable, "
                        f"{trainable / event['param_elements_total']:.2%}), {event['total_steps']} steps")
        elif kind == "preflight":
            self._print(preflight.summary(event["workers"]))
        elif kind == "resume":
            self.display.restart()
            for reason in event["skipped"]:
                self._print(reason)
            self._print(f"resumed at step {record.step} from {event['checkpoint']}")
        elif kind == "resize":
            how = "cached" if event["universal_cached"] else f"converted in {event['universal_s']:.1f} s"
            self._print(f"resized: {event['from_world_size']} -> {event['world_size']} workers at step {record.step} "
                        f"(grad_accum {event['grad_accum']}, the global batch kept); universal checkpoint {how}")
        elif kind == "samples":
            self.samples.append(record)
        elif kind == "end":
            self.end = {"step": record.step, **event}
        elif kind == "error":
            self.errors.append(event["message"])
        elif kind == "warning":
            self.warnings.append(event["message"])
            self._print(f"warning: {event['message']}")

    def _append(self, name: str, record: Record) -> None:
        try:
            append_line(self.run_dir / name, json.dumps(record.to_json()))
        except OSError as err:
            self.write_error = self.write_error or f"could not write {name} at step {record.step}: {err}"

    def _resumed(self, resume: EventRecord) -> EventRecord:
        """The files as one uninterrupted run up to the resumed step: records of later steps (trained again)
        dropped, those the checkpoint carries and the files lack filled in. Returns the event to write."""
        carried = [record_from_json(r) for r in resume.fields.get("records", [])]
        step = resume.step
        for name, is_samples in (("metrics.jsonl", False), ("samples.jsonl", True)):
            ours = [r for r in carried if _is_samples(r) == is_samples and r.step <= step]
            merged = _merged(read_records(self.run_dir / name), ours, step)
            try:
                if merged or (self.run_dir / name).is_file():
                    write_text(self.run_dir / name, "".join(json.dumps(r.to_json()) + "\n" for r in merged))
            except OSError as err:
                self.write_error = self.write_error or f"could not rewrite {name} on resume: {err}"
            if is_samples:
                self.samples = merged
            else:
                self.evals = [r for r in merged if isinstance(r, EvalRecord)]
        return EventRecord(step, resume.kind, {k: v for k, v in resume.fields.items() if k != "records"})

    def train_records(self) -> list[TrainRecord]:
        return [r for r in read_records(self.run_dir / "metrics.jsonl") if isinstance(r, TrainRecord)]

    def worker_error(self) -> str | None:
        return "; ".join(self.errors) or None

    def summary(self, data_stats: dict, error: str | None = None, best_checkpoint: dict | None = None
                ) -> dict[str, Any]:
        ended = self.end.get("stop_reason")
        # A non-finite step ends the loop as agreed (with an error); other failures end it with "error".
        stop_reason = ended if ended == "non_finite" else "error" if error else ended
        best = {k: self.end.get(k) for k in ("metric", "best", "best_step")}
        return {
            "status": "failed" if error else "stopped" if stop_reason == "stop" else "completed",
            "run_dir": str(self.run_dir),
            "steps": self.end.get("step", self.last_train.step if self.last_train else 0),
            "total_steps": self.setup.get("total_steps"),
            # max_steps, epochs, early_stopping, or stop (SIGTERM: saved, to be continued with --resume)
            "stop_reason": stop_reason,
            "final": {k: v for k, v in self.last_train.to_json().items() if k not in ("epoch", "total_steps")}
            if self.last_train else {},
            "eval_first": self.evals[0].to_json() if self.evals else None,
            "eval_last": self.evals[-1].to_json() if self.evals else None,
            # The best validation seen (perhaps at step 0, before training), and the best checkpoint kept.
            "best": {"metric": best["metric"], "value": best["best"], "step": best["best_step"]}
            if best["best"] is not None else None,
            "best_checkpoint": best_checkpoint,
            "data": data_stats,
            "duration_s": round(time.time() - self.started_s, 1),
            "warnings": self.warnings,
            "error": error,
        }

    def before_after(self) -> str:
        """The demo's closing lines: held-out loss and answers, first evaluation versus last."""
        lines = []
        if len(self.evals) >= 2:
            first, last = self.evals[0], self.evals[-1]
            (name, before), (_, after) = first.headline, last.headline  # eval_loss, or a detector's eval_map
            lines.append(f"held-out {name}: {before:.4f} (step {first.step}) -> {after:.4f} (step {last.step})")
            for key in TASK_METRICS:  # classification tasks: their metrics, before versus after
                if key in first.metrics and key in last.metrics:
                    lines.append(f"held-out {key}: {first.metrics[key]:.4f} (step {first.step}) -> "
                                 f"{last.metrics[key]:.4f} (step {last.step})")
        if len(self.samples) >= 2:
            before, after = self.samples[0].fields["samples"], self.samples[-1].fields["samples"]
            hits = [sum(s["exact_match"] for s in x) for x in (before, after)]
            lines.append(f"held-out answers, exact match {hits[0]}/{len(before)} -> {hits[1]}/{len(after)}:")
            for b, a in zip(before, after):
                lines.append(f"  prompt:   {b['prompt']}\n  expected: {b['expected']}\n"
                             f"  before:   {b['answer']!r}{_cut_note(b)}\n  after:    {a['answer']!r}{_cut_note(a)}")
        return "\n".join(lines)

    def close(self, status: str) -> None:
        """The run is over: end the live line, close the sinks (MLflow also attaches the run's files)."""
        self.display.close()
        for sink in self.sinks:
            sink.close(self.run_dir, status)

    def _print(self, line: str) -> None:
        self.display.message(line)


def _cut_note(sample: dict[str, Any]) -> str:
    """Said of an answer that stopped at the token limit without its end token: it may be cut short."""
    if not sample.get("hit_max_new_tokens"):
        return ""
    return f" (stopped at max_new_tokens={sample['max_new_tokens']} without an end token)"
def read_records(path: Path) -> list[Record]:
    """A run's metrics.jsonl or samples.jsonl as records (none if it does not exist)."""
    return [record_from_json(line) for line in read_jsonl(path)]


def _is_samples(record: Record) -> bool:
    return isinstance(record, EventRecord) and record.kind == "samples"


def _is_step_record(record: Record) -> bool:
    """One per step and kind (training, validation, samples), unlike the events of an attempt (setup...)."""
    return not isinstance(record, EventRecord) or record.kind == "samples"


def _kind(record: Record) -> tuple[str, int]:
    """What identifies a record: one training record, one validation and one samples record per step."""
    return (record.kind if isinstance(record, EventRecord) else type(record).__name__, record.step)


def _merged(written: list[Record], carried: list[Record], step: int) -> list[Record]:
    """`written` without the step records after `step`, with the `carried` ones it lacks put after its
    last step record (before the events of the attempt now starting: its setup, preflight)."""
    kept = [r for r in written if not _is_step_record(r) or r.step <= step]
    have = {_kind(r) for r in kept if _is_step_record(r)}
    missing = [r for r in carried if _kind(r) not in have]
    last = max((i for i, r in enumerate(kept) if _is_step_record(r)), default=-1)
    return kept[: last + 1] + missing + kept[last + 1:]
