"""The training loop, run identically on every worker: set up (or restore), then for each step:
train → log → maybe validate → agree whether to stop → maybe checkpoint. Also `sft-dist eval`'s
worker side, which sets up the same way and validates once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from transformers import set_seed

from sft_dist import adapters, checkpoint, faults, preflight, quiet, shipping
from sft_dist import engine as engine_lib
from sft_dist import model as model_lib
from sft_dist.config import RunConfig
from sft_dist.data.batches import BatchPlan, TextBatches, grouping_lengths, model_inputs
from sft_dist.data.images import ImageBatches
from sft_dist.data.prepare import PreparedData
from sft_dist.data.templates import chat_template
from sft_dist.evaluate import BestTracker, deadline, generate_answers, generation_metrics, validate
from sft_dist.health import Health
from sft_dist.loss import token_loss_sums
from sft_dist.lr_find import Divergence
from sft_dist.runtime import Job, RunContext, all_gather, all_reduce_sum
from sft_dist.storage import Location
from sft_dist.tasks import task_of
from sft_dist.tasks.heads import LossFn
from sft_dist.timing import OFF, StepTimer


def total_steps(cfg: RunConfig, plan: BatchPlan) -> int:
    return cfg.train.max_steps or plan.steps_per_epoch * cfg.train.epochs


@dataclass
class Session:
    """What a worker holds once set up: the engine and the data it trains and validates on."""

    ctx: RunContext
    cfg: RunConfig
    engine: Any
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

    def validate(self, step: int) -> dict[str, Any]:
        """Collective: validation loss (and generation) on every rank; the metrics are emitted and returned."""
        cfg, ctx, metrics = self.cfg, self.ctx, {}

        def fail(message: str) -> None:  # the watchdog's last word, before it ends this process
            ctx.emit({"step": step, "event": "error", "message": message})

        if self.eval_set is not None:
            with deadline(cfg.eval.timeout_s, f"validation at step {step}", ctx.rank, fail):
                faults.maybe_hang(cfg.debug, ctx.rank, step)
                mb = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
                metrics.update(validate(self.engine, ctx, self.eval_set, mb, self.batches,
                                        task_of(cfg).counts(cfg.model)))
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
           own_checkpoint: bool = False) -> tuple[Session, dict[str, Any]]:
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
    plan = BatchPlan(len(train_set), cfg.train.micro_batch_size, cfg.grad_accum_at(ctx.world_size), ctx.world_size, cfg.seed,
                     grouping_lengths(train_set, cfg.data.group_by_length))
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


def run_job(ctx: RunContext, cfg: RunConfig, data: PreparedData, job: Job) -> None:
    try:
        if job.kind == "eval":
            evaluate_checkpoint(ctx, cfg, data, job.checkpoint)
        else:
            run(ctx, cfg, data, job.resume_from, stop_on_divergence=job.kind == "lr_find")
    finally:  # a process that goes on after the job (--no-ray, tests) builds its next models unpartitioned
        engine_lib.forget_zero3_construction()


def run(ctx: RunContext, cfg: RunConfig, data: PreparedData, resume_from: str | None = None,
        stop_on_divergence: bool = False) -> None:
    """Train to the end (or an early stop, or a requested stop). Every rank runs every line, so
    collectives stay symmetric; every stop decision is agreed by all ranks before it is acted on."""
    restart, skipped = resume_point(ctx, cfg, resume_from)
    session, loop_state = set_up(ctx, cfg, data, restart, skipped, is_own(ctx, restart))
    engine, plan = session.engine, session.plan
    steps, start = total_steps(cfg, plan), loop_state.get("step", 0)
    tracker = BestTracker.for_config(cfg.eval, loop_state.get("best"))
    supervised_per_example = np.asarray(session.train_set["num_supervised"])
    timer = StepTimer(cfg.logging.timing, ctx.device, engine_lib.comm_seconds if cfg.logging.timing else None)
    loss_fn = task_of(cfg).loss(cfg.train)
    saved_steps = [start] if start else []  # a resumed run's checkpoint is a saved state too

    def save(step: int, metrics: dict[str, Any]) -> None:
        state = {"step": step, "examples_seen": step * plan.global_batch_size, "seed": cfg.seed,
                 "epoch": step // plan.steps_per_epoch, "best": tracker.state(),
                 "fingerprint": data.fingerprint, "config": cfg.model_dump(mode="json")}
        score = tracker.score(metrics)
        checkpoint.save(engine, ctx, state,
                        {"step": step, **metrics, checkpoint.SCORE: checkpoint.UNSCORED if score is None else score},
                        session.history)
        saved_steps.append(step)

    def train_metrics(step: int) -> dict[str, Any]:  # collective: the window's loss is all-reduced
        return {"step": step, "epoch": step / plan.steps_per_epoch, "total_steps": steps, "world_size": ctx.world_size,
                **window.reduce(),
                "lr": engine.get_lr()[0], **grad_norm(engine), **timer.metrics()}

    if cfg.eval.at_start and start == 0:
        tracker.update(session.validate(0), 0)
    window, reason, step, preemption_saved = Window(), None, start, False
    divergence = Divergence() if stop_on_divergence else None
    health = Health()
    for step in range(start + 1, steps + 1):  # `step` counts optimizer steps completed after this one
        faults.maybe_fail(cfg.debug, ctx.storage, ctx.rank, step)
        loss_sum, tokens, supervised = train_step(engine, ctx, session.train_set, plan, step - 1,
                                                  supervised_per_example, session.batches, loss_fn, timer)
        window.add(loss_sum, tokens, supervised)
        faults.pace(cfg.debug)
        train_log = train_metrics(step) if step % cfg.logging.every_steps == 0 or step == steps else None
        if train_log:
            session.emit(train_log)
        metrics = session.validate(step) if validation_due(cfg, plan, step, steps) else {}
        tracker.update(metrics, step)
        diverged = divergence is not None and train_log is not None and divergence.update(train_log["loss"])
        # The range test ends on a divergence (above); a training run stops on a non-finite step.
        problem = None if divergence else judge_step(ctx, cfg, health, step, loss_sum, engine.get_global_grad_norm())
        stopping = "early_stopping" if tracker.should_stop() else "diverged" if diverged else None
        reason = agreed_stop(ctx, "non_finite" if problem else stopping)
        if reason in ENDING and train_log is None:  # the last step is always in metrics.jsonl
            session.emit(train_metrics(step))
        # A preemption notice: save once and train on; Ray restarts the run from this checkpoint when the
        # node is gone. A stop request saves whether or not periodic checkpoints are on: it is the only
        # way the run can be continued. A non-finite step saves nothing: the newest checkpoint stays
        # the last finite state.
        just_in_time = reason == "preempted" and not preemption_saved and step != steps
        periodic = cfg.checkpoint.every_steps and step != steps and (
            step % cfg.checkpoint.every_steps == 0 or reason == "early_stopping")
        if reason != "non_finite" and (just_in_time or periodic or reason == "stop"):
            save(step, metrics)
        preemption_saved |= just_in_time
        if reason == "non_finite":
            ctx.emit({"step": step, "event": "error", "message": non_finite_message(step, problem, saved_steps)})
        if reason in ENDING:
            break
    else:
        reason = "max_steps" if cfg.train.max_steps else "epochs"
        if step > start:  # not a resume of a run that had already finished
            metrics = session.validate(step) if cfg.eval.at_end else {}
            tracker.update(metrics, step)
            if cfg.checkpoint.every_steps:
                save(step, metrics)
    ctx.emit({"step": step, "event": "end", "stop_reason": reason, "metric": tracker.metric, **tracker.state()})


ENDING = ("stop", "early_stopping", "diverged", "non_finite")  # reasons that end the loop (a preemption does not)


def judge_step(ctx: RunContext, cfg: RunConfig, health: Health, step: int, loss_sum: float,
               norm: float | None) -> str | None:
    """Why this rank's step is not finite (None if it is); warns once of a dead model."""
    dead = health.dead_model(step, norm)
    if dead:
        ctx.emit({"step": step, "event": "warning", "message": dead})
    # Under fp16 an infinite gradient norm is loss scaling at work: DeepSpeed skips the step, lowers the scale.
    return health.non_finite(step, ctx.rank, loss_sum, None if cfg.train.precision == "fp16" else norm)


def non_finite_message(step: int, problem: str | None, saved_steps: list[int]) -> str:
    """What rank 0 reports of a non-finite step (another rank may have seen it first)."""
    what = problem or f"another rank's training loss was not finite at step {step}"
    kept = f"its newest checkpoint, step {saved_steps[-1]}, is the last finite state" if saved_steps \
        else "no checkpoint of it was saved"
    return f"{what}; the run stopped without saving this state ({kept}); lower train.lr or check the data"


def validation_due(cfg: RunConfig, plan: BatchPlan, step: int, steps: int) -> bool:
    """A periodic validation at this step (the final one is the loop's own, with eval.at_end)."""
    periodic = cfg.eval.every_steps and step % cfg.eval.every_steps == 0
    epoch_end = cfg.eval.at_epoch_end and step % plan.steps_per_epoch == 0
    return bool(periodic or epoch_end) and step != steps


def agreed_stop(ctx: RunContext, local_reason: str | None) -> str | None:
    """Collective: why the run stops now, as every rank agrees (the last of `reasons` any rank has wins:
    a non-finite step on one rank stops them all, before a stop request could save that state).

    A SIGTERM or preemption notice may reach one rank before another; the all-reduce makes all ranks
    act at the same step, so no rank is left alone in the next collective.
    """
    reasons = ("diverged", "early_stopping", "preempted", "stop", "non_finite")
    local = [local_reason, ctx.interruption()]
    flags = torch.tensor([float(any(r == reason for r in local)) for reason in reasons], dtype=torch.float64)
    agreed = all_reduce_sum(flags)
    return next((reason for reason, flag in zip(reversed(reasons), reversed(agreed.tolist())) if flag), None)


def evaluate_checkpoint(ctx: RunContext, cfg: RunConfig, data: PreparedData, folder: str) -> None:
    """`sft-dist eval`: the run's validation on a saved checkpoint, distributed like training."""
    session, loop_state = set_up(ctx, cfg, data, Location.of(folder))
    session.validate(loop_state["step"])
    ctx.emit({"step": loop_state["step"], "event": "end", "stop_reason": "evaluated"})


def is_own(ctx: RunContext, restart: Location | None) -> bool:
    """Whether `restart` is a checkpoint of this run (a recovery, --resume auto), not of the run that
    --resume PATH named: a new run's records start after the checkpoint, as they always have."""
    return restart is not None and restart.parent == ctx.storage


def build_and_restore(
    ctx: RunContext, cfg: RunConfig, steps: int, restart: Location | None, skipped: list[str] = (),
    own_checkpoint: bool = False,
) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """The engine, restored from `restart` when given; the loop state saved with it; and (rank 0, for
    the run's own checkpoint) the records it carries, which the resume event hands to the driver to fill
    in what metrics.jsonl lacks."""
    saved_world_size = checkpoint.read_manifest(restart)["world_size"] if restart is not None else ctx.world_size
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
        return engine, {}, []
    loop_state = checkpoint.load(engine, ctx, restart)
    records = checkpoint.read_records(restart) if ctx.rank == 0 and own_checkpoint else []
    ctx.emit({"step": loop_state["step"], "event": "resume", "checkpoint": str(restart), "skipped": list(skipped),
              "records": records})
    if resize:  # after the resume event, which rewrites metrics.jsonl up to the resumed step
        ctx.emit({"step": loop_state["step"], **resize})
    return engine, loop_state, records


def resume_point(ctx: RunContext, cfg: RunConfig, requested: str | None) -> tuple[Location | None, list[str]]:
    """The checkpoint to continue from (None: a fresh start), and the torn ones skipped on the way.

    The run's own newest complete checkpoint (there after a worker failure, or with --resume auto)
    wins over a checkpoint of another run named by --resume PATH. The run's storage (a folder or an
    object store) is scanned rather than trusting Ray's registry: a worker that dies hard can take a
    checkpoint's registration with it while its files are complete in storage.
    """
    skipped: list[str] = []
    own = checkpoint.complete_checkpoints(ctx.storage, log=skipped.append)
    chosen = own[-1] if own else Location.of(requested) if requested else None
    return chosen, skipped


def build_engine(ctx: RunContext, cfg: RunConfig, steps: int, load_universal: bool = False) -> Any:
    ds_config = engine_lib.deepspeed_config(cfg, ctx.world_size, load_universal)
    dtype = model_lib.weight_dtype(cfg.model, cfg.train.precision)
    model = model_lib.build(cfg.model, dtype, engine_lib.model_construction(ds_config),
                            adapters.quantized_loading(cfg.peft, dtype, ctx.device), cfg.train.neftune_alpha)
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
              "total_steps": steps, "param_elements_total": total, "param_elements_per_rank": all_gather(local),
              "trainable_params": trainable, "param_groups": engine_lib.group_summary(groups),
              "optimizer_lrs": [g["lr"] for g in engine.optimizer.param_groups]})
    return engine


def train_step(
    engine: Any, ctx: RunContext, train_set: Any, plan: BatchPlan, step: int, supervised: np.ndarray,
    batches: TextBatches | ImageBatches, loss_fn: LossFn = token_loss_sums, timer: StepTimer = OFF,
) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches.

    Returns (this rank's summed loss, this rank's real tokens, the global batch's supervised tokens).
    ("Supervised tokens" are examples for sequence and image classification: the loss is then a mean
    per example; an image counts as one token.)
    """
    # Every rank knows the whole global batch's supervised token count without communicating, so each
    # micro-batch's summed loss can be divided by it up front: the gradient is then the mean over all
    # supervised tokens of the global batch, not a mean of per-rank or per-micro-batch means.
    global_tokens = int(supervised[plan.global_batch(step)].sum())
    # DeepSpeed divides by grad_accum (in backward) and averages over ranks (in the gradient reduce);
    # multiplying by both undoes those so the token-weighted normalization above is the only one.
    scale = plan.grad_accum * plan.world_size / global_tokens
    loss_total = tokens = 0.0
    timer.start()
    for indices in plan.micro_batches(step, ctx.rank):
        rows = train_set[[int(i) for i in indices]]
        batch = {k: v.to(ctx.device) for k, v in batches(rows, indices, step).items()}
        timer.lap("data")
        logits = engine(**model_inputs(batch)).logits
        loss_sum, _, _ = loss_fn(logits, batch["labels"])
        timer.lap("forward")
        engine.backward(loss_sum * scale)
        timer.lap("backward")
        engine.step()  # DeepSpeed steps the optimizer and scheduler only at the accumulation boundary
        timer.lap("optimizer")
        loss_total += loss_sum.item()
        tokens += sum(rows["length"])
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
