"""A worker's setup: the engine built (or restored from a checkpoint) and the data it trains and validates on,
as a `Session`; also where a run continues from (its own newest checkpoint, or --resume PATH's)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import set_seed

from sft_dist import checkpoints, quiet, shipping
from sft_dist.config import RunConfig
from sft_dist.data.batches import BatchPlan, TextBatches, grouping_lengths
from sft_dist.data.images import ImageBatches
from sft_dist.data.prepare import PreparedData
from sft_dist.data.templates import chat_template
from sft_dist.modeling import adapters, packed_attention
from sft_dist.modeling import model as model_lib
from sft_dist.modeling.loss import ChunkedTokenLoss, chunked_loss_of
from sft_dist.records import LoopState
from sft_dist.storage import Location
from sft_dist.tasks import task_of
from sft_dist.worker import checkpoint, faults, preflight
from sft_dist.worker import engine as engine_lib
from sft_dist.worker.evaluate import deadline, generate_answers, generation_metrics, validate, validate_gathered
from sft_dist.worker.runtime import RunContext, all_gather
from sft_dist.worker.train_engine import TrainEngine


def total_steps(cfg: RunConfig, plan: BatchPlan) -> int:
    return cfg.train.max_steps or plan.steps_per_epoch * cfg.train.epochs


@dataclass
class Session:
    """What a worker holds once set up: the engine and the data it trains and validates on."""

    ctx: RunContext
    cfg: RunConfig
    engine: TrainEngine
    tokenizer: Any  # None for images
    train_set: Any
    eval_set: Any | None
    prompts: list[dict]
    plan: BatchPlan
    batches: TextBatches | ImageBatches  # saved rows -> model inputs
    # Rank 0's records of the run so far (those of a restored checkpoint first): every checkpoint
    # carries them, so records the driver never wrote (it died) come back with a resume.
    history: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, record: dict[str, Any]) -> None:
        """A training, validation or samples record: to the driver, and kept for the next checkpoint."""
        self.ctx.emit(record)
        if self.ctx.rank == 0:
            self.history.append(record)

    def chunked_loss(self, label_smoothing: float) -> ChunkedTokenLoss | None:
        """The causal LM's loss without the full logits, where `train.chunked_loss` turns it on."""
        train = self.cfg.train
        if not task_of(self.cfg).labels_are_tokens:  # classifiers: their loss is on a small head
            return None
        return chunked_loss_of(self.engine.module, train.chunked_loss, train.loss_chunk_tokens, label_smoothing,
                               self.cfg.deepspeed.stage == 3)

    def validate(self, step: int) -> dict[str, Any]:
        """Collective: validation loss (and generation) on every rank; the metrics are emitted and returned."""
        cfg, ctx, metrics = self.cfg, self.ctx, {}

        def fail(message: str) -> None:  # the watchdog's last word, before it ends this process
            ctx.emit({"step": step, "event": "error", "message": message})

        if self.eval_set is not None:
            with deadline(cfg.eval.timeout_s, f"validation at step {step}", ctx.rank, fail):
                faults.maybe_hang(cfg.debug, ctx.rank, step)
                mb = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
                task = task_of(cfg)
                counter = task.counts(cfg.model)
                if task.gathers:
                    metrics.update(validate_gathered(self.engine, ctx, self.eval_set, mb, self.batches, counter))
                else:
                    metrics.update(validate(self.engine, ctx, self.eval_set, mb, self.batches, counter,
                                            self.chunked_loss(0.0)))
            if getattr(counter, "samples", None):  # a recogniser's first transcripts, as generation's samples
                self.emit({"step": step, "event": "samples", "samples": counter.samples})
        if cfg.eval.generate and self.prompts:
            with deadline(cfg.eval.timeout_s, f"generation at step {step}", ctx.rank, fail):
                samples = generate_answers(self.engine, ctx, self.tokenizer, self.prompts, cfg.eval.generate,
                                           cfg.deepspeed.stage == 3)
            metrics.update(generation_metrics(samples))
            self.emit({"step": step, "event": "samples", "samples": samples})
        if metrics:
            self.emit({"step": step, **metrics})
        return metrics


def set_up(ctx: RunContext, cfg: RunConfig, data: PreparedData, restart: Location | None, skipped: list[str] = (),
           own_checkpoint: bool = False) -> tuple[Session, LoopState]:
    """Build the session, restored from `restart` when given; returns it with the saved loop state.
    `own_checkpoint`: `restart` is this run's, so its records are this run's history too."""
    set_seed(cfg.seed)
    quiet.deepspeed_op_builds(cfg.ray.use_gpu, cfg.deepspeed.offload_optimizer, ctx.local_rank)
    engine_lib.init_distributed()
    preflight.check(ctx, cfg)  # every worker checks in before minutes go into loading weights
    # Loading uses the shipped folders as this node has them; the session (and so every checkpoint)
    # keeps the driver's config.
    here, data = fetch_shipment(ctx, cfg, data)
    tokenizer = model_lib.load_tokenizer(here.model) if task_of(cfg).needs_tokenizer else None
    if cfg.data.chat_template:  # generation prompts render as the training data did
        tokenizer.chat_template = chat_template(tokenizer, here.data.chat_template)
    train_set = datasets.load_from_disk(data.train_dir)
    eval_set = datasets.load_from_disk(data.eval_dir) if data.eval_dir else None
    plan = BatchPlan(len(train_set), cfg.train.micro_batch_size, cfg.grad_accum_at(ctx.world_size), ctx.world_size,
                     cfg.seed, grouping_lengths(train_set, cfg.data.group_by_length))
    engine, loop_state, history = build_and_restore(ctx, here, total_steps(cfg, plan), restart, skipped,
                                                    own_checkpoint)
    batches = batch_maker(here, tokenizer, engine.module)
    return Session(ctx, cfg, engine, tokenizer, train_set, eval_set, data.prompts, plan, batches, history), loop_state


def fetch_shipment(ctx: RunContext, cfg: RunConfig, data: PreparedData) -> tuple[RunConfig, PreparedData]:
    """The config and data as this node has them (sft_dist.shipping); rank 0 records how each rank found them.

    Collective when the data was shipped (one all_gather; every rank has the same shipment).
    """
    here, data, found = shipping.on_this_node(cfg, data)
    if data.shipment:
        ctx.emit({"step": 0, "event": "shipping", "ranks": all_gather({"rank": ctx.rank, **found})})
    return here, data


def batch_maker(cfg: RunConfig, tokenizer: Any, module: torch.nn.Module) -> TextBatches | ImageBatches:
    """How saved rows become this model's inputs: padded tokens, or the image processor's pixels (the task's)."""
    return task_of(cfg).batches(cfg, tokenizer, module)


def is_own(ctx: RunContext, restart: Location | None) -> bool:
    """Whether `restart` is a checkpoint of this run (a recovery, --resume auto), not of the run that
    --resume PATH named: a new run's records start after the checkpoint, as they always have."""
    return restart is not None and restart.parent == ctx.storage


def build_and_restore(
    ctx: RunContext, cfg: RunConfig, steps: int, restart: Location | None, skipped: list[str] = (),
    own_checkpoint: bool = False,
) -> tuple[TrainEngine, LoopState, list[dict[str, Any]]]:
    """The engine, restored from `restart` when given; the loop state saved with it; and (rank 0, for
    the run's own checkpoint) the records it carries, which the resume event hands to the driver to fill
    in what metrics.jsonl lacks."""
    saved_world_size = checkpoints.read_manifest(restart).world_size if restart is not None else ctx.world_size
    resize = None
    if saved_world_size != ctx.world_size:
        # Into this run's own folder: the source may be another run's, which is not ours to write to.
        cached, started_s = checkpoint.has_universal_copy(restart, ctx.storage), time.perf_counter()
        restart = checkpoint.universal_copy(restart, ctx, ctx.storage)
        resize = {"event": "resize", "from_world_size": saved_world_size, "world_size": ctx.world_size,
                  "grad_accum": cfg.grad_accum_at(ctx.world_size), "universal_cached": cached,
                  "universal_s": round(time.perf_counter() - started_s, 3)}
    engine = build_engine(ctx, cfg, steps, load_universal=resize is not None)
    if restart is None:
        return engine, LoopState(), []  # a fresh start
    loop_state = checkpoint.load(engine, ctx, restart)
    records = checkpoints.read_records(restart) if ctx.rank == 0 and own_checkpoint else []
    ctx.emit({"step": loop_state.step, "event": "resume", "checkpoint": str(restart), "skipped": list(skipped),
              "records": records})
    if resize:  # after the resume event, which rewrites metrics.jsonl up to the resumed step
        ctx.emit({"step": loop_state.step, **resize})
    return engine, loop_state, records


def resume_point(ctx: RunContext, cfg: RunConfig, requested: str | None) -> tuple[Location | None, list[str]]:
    """The checkpoint to continue from (None: a fresh start), and the torn ones skipped on the way.

    The run's own newest complete checkpoint (there after a worker failure, or with --resume auto)
    wins over a checkpoint of another run named by --resume PATH. The run's storage (a folder or an
    object store) is scanned rather than trusting Ray's registry: a worker that dies hard can take a
    checkpoint's registration with it while its files are complete in storage.
    """
    skipped: list[str] = []
    own = checkpoints.complete_checkpoints(ctx.storage, log=skipped.append)
    chosen = own[-1] if own else Location.of(requested) if requested else None
    return chosen, skipped


def build_engine(ctx: RunContext, cfg: RunConfig, steps: int, load_universal: bool = False) -> TrainEngine:
    ds_config = engine_lib.deepspeed_config(cfg, ctx.world_size, load_universal)
    dtype = model_lib.weight_dtype(cfg.model, cfg.train.precision)
    model = model_lib.build(cfg.model, dtype, engine_lib.model_construction(ds_config, task_of(cfg).partitions),
                            adapters.quantized_loading(cfg.peft, dtype, ctx.device), cfg.train.neftune_alpha)
    if cfg.data.packing:  # attention per packed example, not over the whole row (where sdpa would run)
        packed_attention.use_for_packing(model)
    model = adapters.wrap(model, cfg.peft, model_lib.PRECISION_DTYPES[cfg.train.precision],
                          cfg.model.gradient_checkpointing, cfg.model.task)
    # from_pretrained returns a model in eval mode: without this, model.dropout and NEFTune (which act
    # only in training mode) would never act in training.
    model.train()
    trainable = adapters.trainable_elements(model)
    groups = engine_lib.parameter_groups(model, cfg.train)
    engine = engine_lib.initialize(model, cfg, ds_config, steps, groups)
    local, total = engine_lib.parameter_elements(engine.module)
    ctx.emit({"step": 0, "event": "setup", "world_size": ctx.world_size, "zero_stage": cfg.deepspeed.stage,
              "attention": getattr(model.config, "_attn_implementation", None),
              "total_steps": steps, "param_elements_total": total, "param_elements_per_rank": all_gather(local),
              "trainable_params": trainable, "param_groups": engine_lib.group_summary(groups),
              "optimizer_lrs": [g["lr"] for g in engine.optimizer.param_groups]})
    return engine
