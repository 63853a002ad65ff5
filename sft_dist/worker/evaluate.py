"""Coordinated validation: every rank evaluates a disjoint shard, totals are all-reduced, and every rank
gets the same metrics. Also greedy generation on held-out prompts, in lockstep on all ranks; the best
metric and early-stopping state; and a watchdog that fails a validation that hangs.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sft_dist.config import EvalConfig, GenerateConfig
from sft_dist.data.batches import eval_batches, model_inputs, on_device
from sft_dist.modeling import model_folder
from sft_dist.modeling.loss import ChunkedTokenLoss
from sft_dist.tasks.heads import TokenCounts
from sft_dist.worker.runtime import RunContext, all_gather, all_reduce_sum
from sft_dist.worker.train_engine import TrainEngine


def validate(engine: TrainEngine, ctx: RunContext, eval_set: Any, micro_batch_size: int, batches: Callable,
             counter: Any = None, chunked: ChunkedTokenLoss | None = None) -> dict[str, float]:
    """The task's metrics over the whole eval set, from counts summed over ranks (`counter`, from
    the task's `counts`; by default the causal LM's token-weighted loss, perplexity and token accuracy).
    `batches` makes model inputs of saved rows (`TextBatches`, `ImageBatches`), unaugmented here.
    `chunked`: the causal LM's counts without the full logits (its label smoothing 0: the plain loss).

    Collective: every rank calls it at the same step (each forward under ZeRO-3 gathers parameters).
    """
    counter = counter or TokenCounts()
    module = engine.module
    was_training = module.training
    module.eval()
    totals = torch.zeros(counter.size, dtype=torch.float64)
    with torch.no_grad():
        for indices in eval_batches(len(eval_set), micro_batch_size, ctx.rank, ctx.world_size):
            # A rank whose share ran out still runs a forward (on example 0), counted with weight 0.
            rows = eval_set[[int(i) for i in indices] or [0]]
            batch = on_device(batches(rows), ctx.device)
            if chunked:
                sums = chunked(engine, model_inputs(batch), batch["labels"])
                counts = torch.stack([s.double().cpu() for s in sums])
            elif hasattr(counter, "batch_counts"):  # counts of more than the logits (generated transcripts)
                counts = counter.batch_counts(engine, batch, indices, synced=ctx.world_size > 1)
            else:
                counts = counter.counts(engine(**model_inputs(batch)).logits, batch["labels"])
            if len(indices):
                totals += counts
    module.train(was_training)
    return counter.metrics(all_reduce_sum(totals).tolist())


def validate_gathered(engine: TrainEngine, ctx: RunContext, eval_set: Any, micro_batch_size: int, batches: Callable,
                      scorer: Any) -> dict[str, float]:
    """The task's metrics over the whole eval set from per-example records gathered from every rank
    (`scorer`, from the task's `counts` when the task `gathers`: `records(outputs, batch, rows, row_ids)`
    per batch, `metrics(records)` once over all of them). For a metric that is not a sum of per-rank
    parts, such as COCO mAP (it ranks every detection of the set by score).

    Collective, as `validate`: every rank runs the same number of forwards, then one all_gather.
    """
    module = engine.module
    was_training = module.training
    module.eval()
    records: list[dict] = []
    with torch.no_grad():
        for indices in eval_batches(len(eval_set), micro_batch_size, ctx.rank, ctx.world_size):
            row_ids = [int(i) for i in indices] or [0]  # a rank whose share ran out: a forward, no records
            rows = eval_set[row_ids]
            batch = on_device(batches(rows, row_ids), ctx.device)
            outputs = engine(**model_inputs(batch))
            if len(indices):
                records += scorer.records(outputs, batch, rows, row_ids)
    module.train(was_training)
    return scorer.metrics([record for rank_records in all_gather(records) for record in rank_records])


def generate_answers(
    engine: TrainEngine, ctx: RunContext, tokenizer: Any, prompts: list[dict], generate: GenerateConfig, zero3: bool
) -> list[dict[str, Any]]:
    """Greedy answers to held-out prompts, scored by exact match and by the configured match rule; each
    sample says whether it stopped at the token limit without an end token (`hit_max_new_tokens`).

    Every rank generates every prompt: under ZeRO-3 each decoding step is a collective, and
    `synced_gpus` keeps ranks stepping together until all have finished.
    """
    module = engine.module
    was_training = module.training
    module.eval()
    limit = generate.max_new_tokens or answer_budget(tokenizer, prompts)
    # Stop at the model's EOS and where the chat template ends a turn (the token the model was trained on).
    ends = model_folder.with_end_ids(module.generation_config.eos_token_id, model_folder.turn_end_ids(tokenizer))
    end_ids = {ends} if isinstance(ends, int) else set(ends or ())
    samples = []
    with torch.no_grad():
        for prompt in prompts:
            inputs = tokenizer.apply_chat_template(
                prompt["messages"], tools=prompt.get("tools"), add_generation_prompt=True, return_tensors="pt",
                return_dict=True,
            ).to(ctx.device)
            output = module.generate(
                **inputs, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=ends, synced_gpus=zero3 and ctx.world_size > 1,
            )
            new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
            answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            expected = prompt["expected"].strip()
            samples.append({"prompt": prompt["messages"][-1]["content"], "expected": expected, "answer": answer,
                            "exact_match": answer == expected, "match": matches(answer, expected, generate),
                            "max_new_tokens": limit,
                            "hit_max_new_tokens": len(new_tokens) >= limit and not end_ids & set(new_tokens)})
    module.train(was_training)
    return samples


MIN_ANSWER_MARGIN = 8  # tokens beyond the longest held-out answer, so a slightly longer answer is seen whole


def answer_budget(tokenizer: Any, prompts: list[dict]) -> int:
    """`eval.generate.max_new_tokens` when unset: the longest held-out answer as the chat template renders
    it (its end-of-turn token included), plus a quarter and at least MIN_ANSWER_MARGIN tokens."""
    longest = max(_answer_tokens(tokenizer, p) for p in prompts)
    return longest + max(MIN_ANSWER_MARGIN, longest // 4)


def _answer_tokens(tokenizer: Any, prompt: dict) -> int:
    answered = [*prompt["messages"], {"role": "assistant", "content": prompt["expected"]}]
    full = tokenizer.apply_chat_template(answered, return_dict=True)["input_ids"]
    before = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, return_dict=True)
    return len(full) - len(before["input_ids"])


def generation_metrics(samples: list[dict[str, Any]]) -> dict[str, float]:
    return {"eval_exact_match": sum(s["exact_match"] for s in samples) / len(samples),
            "eval_match": sum(s["match"] for s in samples) / len(samples)}


def matches(answer: str, expected: str, generate: GenerateConfig) -> bool:
    """Whether a generated answer counts as right under `eval.generate.match`."""
    if generate.match == "contains":
        return expected in answer
    if generate.match == "regex":
        if generate.pattern is None:
            return re.fullmatch(expected, answer) is not None
        found = re.search(generate.pattern, answer)
        return found is not None and (found.group(1) if found.groups() else found.group(0)).strip() == expected
    if generate.match == "json":
        try:
            return json.loads(answer) == json.loads(expected)
        except json.JSONDecodeError:
            return False
    return answer == expected


@dataclass
class BestTracker:
    """The best value of the validation metric, where it was, and validations since it improved.

    Fed the all-reduced metrics, it reaches the same state on every rank; it is saved in checkpoints.
    """

    metric: str
    mode: str  # "min" or "max"
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    stale_evals: int = 0

    @classmethod
    def for_config(cls, cfg: EvalConfig, saved: dict[str, Any] | None = None) -> BestTracker:
        stopping = cfg.early_stopping
        tracker = cls(cfg.metric, cfg.direction(), stopping and stopping.patience,
                      stopping.min_delta if stopping else 0.0)
        if saved:  # a resumed run keeps its best and its patience count
            tracker.best, tracker.best_step = saved["best"], saved["best_step"]
            tracker.stale_evals = saved["stale_evals"]
        return tracker

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        """Take one validation's metrics; True when they are a new best."""
        if self.metric not in metrics:
            return False
        value = metrics[self.metric]
        gain = (self.best - value if self.mode == "min" else value - self.best) if self.best is not None else math.inf
        if self.best is None or gain > 0:
            self.best, self.best_step = value, step
        self.stale_evals = 0 if gain > self.min_delta else self.stale_evals + 1
        return self.best_step == step

    def should_stop(self) -> bool:
        return self.patience is not None and self.stale_evals >= self.patience

    def score(self, metrics: dict[str, Any]) -> float | None:
        """The metric signed so that higher is better (a checkpoint's retention score); None if absent."""
        if self.metric not in metrics:
            return None
        return -metrics[self.metric] if self.mode == "min" else metrics[self.metric]

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in ("best", "best_step", "stale_evals")}


@contextmanager
def deadline(timeout_s: float | None, phase: str, rank: int, on_timeout: Callable[[str], None]) -> Iterator[None]:
    """Fail the run when the block runs past `timeout_s`.

    A hung collective cannot be interrupted from Python, so the watchdog thread reports the phase and
    ends this process; the runtime then fails the run (or restarts it, with ray.max_failures).
    """
    if timeout_s is None:
        yield
        return

    def expire() -> None:
        message = f"{phase} on rank {rank} ran past eval.timeout_s={timeout_s:g}s"
        on_timeout(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
