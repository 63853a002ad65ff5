"""The training loop, run identically on every worker: set up, then step → log → maybe validate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import set_seed

from sft_dist import adapters, checkpoint, faults
from sft_dist import engine as engine_lib
from sft_dist import model as model_lib
from sft_dist.config import RunConfig, resume_fingerprint
from sft_dist.data.batches import BatchPlan, attention_of, collate, grouping_lengths, model_inputs
from sft_dist.data.prepare import PreparedData
from sft_dist.data.templates import chat_template
from sft_dist.evaluate import generate_answers, validate
from sft_dist.loss import token_loss_sums
from sft_dist.runtime import RunContext, all_gather, all_reduce_sum


def total_steps(cfg: RunConfig, plan: BatchPlan) -> int:
    return cfg.train.max_steps or plan.steps_per_epoch * cfg.train.epochs


def run(ctx: RunContext, cfg: RunConfig, data: PreparedData, resume_from: str | None = None) -> None:
    """Train to the end. Every rank runs every line: collectives stay symmetric."""
    set_seed(cfg.seed)
    engine_lib.init_distributed()
    tokenizer = model_lib.load_tokenizer(cfg.model)
    if cfg.data.chat_template:  # generation prompts render as the training data did
        tokenizer.chat_template = chat_template(tokenizer, cfg.data.chat_template)
    train_set = datasets.load_from_disk(data.train_dir)
    eval_set = datasets.load_from_disk(data.eval_dir) if data.eval_dir else None
    plan = BatchPlan(len(train_set), cfg.train.micro_batch_size, cfg.train.grad_accum, ctx.world_size, cfg.seed,
                     grouping_lengths(train_set, cfg.data.group_by_length))
    steps = total_steps(cfg, plan)
    engine, start = build_and_restore(ctx, cfg, steps, resume_from)
    supervised_per_example = np.asarray(train_set["num_supervised"])
    last_eval: dict[str, Any] = {}

    def evaluate_now(step: int) -> None:
        if eval_set is not None:
            mb = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
            last_eval.update(validate(engine, ctx, eval_set, mb, tokenizer.pad_token_id))
            ctx.emit({"step": step, **last_eval})
        if cfg.eval.generate and data.prompts:
            g = cfg.eval.generate
            samples = generate_answers(engine, ctx, tokenizer, data.prompts, g.max_new_tokens, cfg.deepspeed.stage == 3)
            ctx.emit({"step": step, "event": "samples", "samples": samples})

    def save(step: int) -> None:
        state = {"step": step, "examples_seen": step * plan.global_batch_size, "seed": cfg.seed,
                 "fingerprint": resume_fingerprint(cfg), "config": cfg.model_dump(mode="json")}
        checkpoint.save(engine, ctx, state, {"step": step, **last_eval})

    if cfg.eval.at_start and start == 0:
        evaluate_now(0)
    window = Window()
    for step in range(start + 1, steps + 1):  # `step` counts optimizer steps completed after this one
        faults.maybe_fail(cfg.debug, cfg.run_dir(), ctx.rank, step)
        window.add(*train_step(engine, ctx, train_set, plan, step - 1, supervised_per_example, tokenizer.pad_token_id))
        if step % cfg.logging.every_steps == 0 or step == steps:
            ctx.emit({"step": step, "epoch": step / plan.steps_per_epoch, "total_steps": steps,
                      **window.reduce(), "lr": engine.get_lr()[0], **grad_norm(engine)})
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != steps:
            evaluate_now(step)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step != steps:
            save(step)
    if cfg.eval.at_end:
        evaluate_now(steps)
    if cfg.checkpoint.every_steps:
        save(steps)
    ctx.emit({"step": steps, "event": "end", "stop_reason": "max_steps" if cfg.train.max_steps else "epochs"})


def build_and_restore(ctx: RunContext, cfg: RunConfig, steps: int, requested: str | None) -> tuple[Any, int]:
    """The engine, restored from the checkpoint to continue from if there is one; and its step."""
    restart, skipped = resume_point(ctx, cfg, requested)
    other_world_size = restart is not None and checkpoint.read_manifest(restart)["world_size"] != ctx.world_size
    if other_world_size:
        restart = checkpoint.universal_copy(restart, ctx)
    engine = build_engine(ctx, cfg, steps, load_universal=other_world_size)
    if restart is None:
        return engine, 0
    step = checkpoint.load(engine, ctx, restart)["step"]
    ctx.emit({"step": step, "event": "resume", "checkpoint": str(restart), "skipped": skipped})
    return engine, step


def resume_point(ctx: RunContext, cfg: RunConfig, requested: str | None) -> tuple[Path | None, list[str]]:
    """The checkpoint to continue from (None: a fresh start), and the torn ones skipped on the way.

    The run's own newest complete checkpoint (there after a worker failure, or with --resume auto)
    wins over a checkpoint of another run named by --resume PATH. The run folder is scanned rather
    than trusting Ray's registry alone: a worker that dies hard can take a checkpoint's registration
    with it while its files are complete on disk.
    """
    skipped: list[str] = []
    if "://" in cfg.storage_path():  # object storage: only Ray knows the run's checkpoints
        latest = ctx.restored_checkpoint()
        own = [latest] if latest else []
    else:
        own = checkpoint.complete_checkpoints(Path(cfg.storage_path()) / cfg.run_name, log=skipped.append)
    chosen = own[-1] if own else requested
    return (Path(chosen) if chosen else None), skipped


def build_engine(ctx: RunContext, cfg: RunConfig, steps: int, load_universal: bool = False) -> Any:
    ds_config = engine_lib.deepspeed_config(cfg, ctx.world_size, load_universal)
    dtype = model_lib.weight_dtype(cfg.model, cfg.train.precision)
    model = model_lib.build(cfg.model, dtype, engine_lib.model_construction(ds_config),
                            adapters.quantized_loading(cfg.peft, dtype, ctx.device))
    model = adapters.wrap(model, cfg.peft, model_lib.PRECISION_DTYPES[cfg.train.precision],
                          cfg.model.gradient_checkpointing)
    trainable = adapters.trainable_elements(model)
    engine = engine_lib.initialize(model, cfg, ds_config, steps)
    local, total = engine_lib.parameter_elements(engine.module)
    ctx.emit({"step": 0, "event": "setup", "world_size": ctx.world_size, "zero_stage": cfg.deepspeed.stage,
              "total_steps": steps, "param_elements_total": total, "param_elements_per_rank": all_gather(local),
              "trainable_params": trainable})
    return engine


def train_step(
    engine: Any, ctx: RunContext, train_set: Any, plan: BatchPlan, step: int, supervised: np.ndarray, pad_id: int
) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches.

    Returns (this rank's summed loss, this rank's real tokens, the global batch's supervised tokens).
    """
    # Every rank knows the whole global batch's supervised token count without communicating, so each
    # micro-batch's summed loss can be divided by it up front: the gradient is then the mean over all
    # supervised tokens of the global batch, not a mean of per-rank or per-micro-batch means.
    global_tokens = int(supervised[plan.global_batch(step)].sum())
    # DeepSpeed divides by grad_accum (in backward) and averages over ranks (in the gradient reduce);
    # multiplying by both undoes those so the token-weighted normalization above is the only one.
    scale = plan.grad_accum * plan.world_size / global_tokens
    loss_total = tokens = 0.0
    for indices in plan.micro_batches(step, ctx.rank):
        rows = train_set[[int(i) for i in indices]]
        batch = {k: v.to(ctx.device) for k, v in collate(rows, pad_id, attention_of(engine.module)).items()}
        logits = engine(**model_inputs(batch)).logits
        loss_sum, _, _ = token_loss_sums(logits, batch["labels"])
        engine.backward(loss_sum * scale)
        engine.step()  # DeepSpeed steps the optimizer and scheduler only at the accumulation boundary
        loss_total += loss_sum.item()
        tokens += sum(len(ids) for ids in rows["input_ids"])
    return loss_total, tokens, global_tokens


@dataclass
class Window:
    """Training totals since the last log line, all-reduced when logged."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    supervised: float = 0.0
    started_s: float = field(default_factory=time.perf_counter)

    def add(self, loss_sum: float, tokens: float, global_supervised: int) -> None:
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.supervised += global_supervised

    def reduce(self) -> dict[str, float]:
        """Collective: the window's token-weighted loss and tokens/s over all ranks; then resets."""
        loss_sum, tokens = all_reduce_sum(torch.tensor([self.loss_sum, self.tokens], dtype=torch.float64)).tolist()
        elapsed_s = time.perf_counter() - self.started_s
        # `supervised` is already global: every rank added the same global batch counts.
        metrics = {"loss": loss_sum / self.supervised, "tokens_per_s": tokens / elapsed_s}
        self.loss_sum = self.tokens = self.supervised = 0.0
        self.started_s = time.perf_counter()
        return metrics


def grad_norm(engine: Any) -> dict[str, float]:
    norm = engine.get_global_grad_norm()
    return {} if norm is None else {"grad_norm": float(norm)}
