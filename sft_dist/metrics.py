"""The driver's record of a run: rank 0's events into `metrics.jsonl` (and generated samples into
`samples.jsonl`), the configured sinks (sft_dist.sinks), the progress display (sft_dist.progress),
and what `summary.json` needs at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sft_dist import progress

if TYPE_CHECKING:
    from sft_dist.sinks import Sink

from sft_dist import preflight


# Validation metrics on the console line, in this order (those a record has).
EVAL_SHOWN = ("eval_ppl", "eval_token_acc", "eval_exact_match", "eval_accuracy", "eval_macro_f1",
              "eval_entity_precision", "eval_entity_recall", "eval_entity_f1")
TASK_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_entity_f1")

class RunRecorder:
    def __init__(self, run_dir: Path, out: TextIO | None = None, sinks: list[Sink] = ()):
        self.run_dir, self.out = run_dir, out  # None: whatever sys.stdout is when printing
        self.display = progress.for_stream(out)  # a live line on a terminal, plain lines otherwise
        self.sinks = list(sinks)  # TensorBoard, MLflow, W&B as configured (sft_dist.sinks)
        self.started_s = time.time()
        self.setup: dict[str, Any] = {}
        self.last_train: dict[str, Any] = {}
        self.evals: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.end: dict[str, Any] = {}
        self.errors: list[str] = []  # what workers reported before failing (e.g. a validation timeout)

    def record(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        target = "samples.jsonl" if kind == "samples" else "metrics.jsonl"
        with open(self.run_dir / target, "a") as handle:
            handle.write(json.dumps(event) + "\n")
        for sink in self.sinks:
            sink.write(event)
        if kind == "setup":
            self.setup = event
            trainable = event.get("trainable_params", event["param_elements_total"])
            self._print(f"setup: {event['world_size']} workers, ZeRO-{event['zero_stage']}, "
                        f"{event['param_elements_total']:,} parameters ({trainable:,} trainable, "
                        f"{trainable / event['param_elements_total']:.2%}), {event['total_steps']} steps")
        elif kind == "preflight":
            self._print(preflight.summary(event["workers"]))
        elif kind == "resume":
            self._forget_after(event["step"])
            self.display.restart()
            for reason in event["skipped"]:
                self._print(reason)
            self._print(f"resumed at step {event['step']} from {event['checkpoint']}")
        elif kind == "samples":
            self.samples.append(event)
        elif kind == "end":
            self.end = event
        elif kind == "error":
            self.errors.append(event["message"])
        elif "eval_loss" in event:
            self.evals.append(event)
            shown = [f"{k.removeprefix('eval_')} {event[k]:.{2 if k == 'eval_ppl' else 3}f}" for k in EVAL_SHOWN
                     if k in event]
            self.display.evaluated(event, f"eval  step {event['step']}: eval_loss {event['eval_loss']:.4f} "
                                   + " ".join(shown))
        elif "loss" in event:
            self.last_train = event
            self.display.train(event)

    def _forget_after(self, step: int) -> None:
        """Steps after the checkpoint are trained again: drop their earlier records (e.g. logged before
        a worker failed), so metrics.jsonl reads as one uninterrupted run."""
        path = self.run_dir / "metrics.jsonl"
        events = [json.loads(line) for line in path.read_text().splitlines()]
        kept = [e for e in events if e.get("event") or e["step"] <= step]
        path.write_text("".join(json.dumps(e) + "\n" for e in kept))
        self.evals = [e for e in self.evals if e["step"] <= step]

    def train_events(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        return [e for e in map(json.loads, path.read_text().splitlines()) if "loss" in e] if path.is_file() else []

    def worker_error(self) -> str | None:
        return "; ".join(self.errors) or None

    def summary(self, data_stats: dict, error: str | None = None, best_checkpoint: dict | None = None
                ) -> dict[str, Any]:
        stop_reason = "error" if error else self.end.get("stop_reason")
        best = {k: self.end.get(k) for k in ("metric", "best", "best_step")}
        return {
            "status": "failed" if error else "stopped" if stop_reason == "stop" else "completed",
            "run_dir": str(self.run_dir),
            "steps": self.end.get("step", self.last_train.get("step", 0)),
            "total_steps": self.setup.get("total_steps"),
            # max_steps, epochs, early_stopping, or stop (SIGTERM: saved, to be continued with --resume)
            "stop_reason": stop_reason,
            "final": {k: v for k, v in self.last_train.items() if k not in ("epoch", "total_steps")},
            "eval_first": self.evals[0] if self.evals else None,
            "eval_last": self.evals[-1] if self.evals else None,
            # The best validation seen (perhaps at step 0, before training), and the best checkpoint kept.
            "best": {"metric": best["metric"], "value": best["best"], "step": best["best_step"]}
            if best["best"] is not None else None,
            "best_checkpoint": best_checkpoint,
            "data": data_stats,
            "duration_s": round(time.time() - self.started_s, 1),
            "error": error,
        }

    def before_after(self) -> str:
        """The demo's closing lines: held-out loss and answers, first evaluation versus last."""
        lines = []
        if len(self.evals) >= 2:
            first, last = self.evals[0], self.evals[-1]
            lines.append(f"held-out eval_loss: {first['eval_loss']:.4f} (step {first['step']}) -> "
                         f"{last['eval_loss']:.4f} (step {last['step']})")
            for key in TASK_METRICS:  # classification tasks: their metrics, before versus after
                if key in first and key in last:
                    lines.append(f"held-out {key}: {first[key]:.4f} (step {first['step']}) -> "
                                 f"{last[key]:.4f} (step {last['step']})")
        if len(self.samples) >= 2:
            before, after = self.samples[0]["samples"], self.samples[-1]["samples"]
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
