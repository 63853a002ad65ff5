"""The training loop, run identically on every worker: set up (or restore), then for each step:
train → log → maybe validate → agree whether to stop → maybe checkpoint. Also `sft-dist eval`'s
worker side, which sets up the same way and validates once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sft_dist import checkpoints
from sft_dist.config import RunConfig
from sft_dist.data.batches import BatchPlan, TextBatches, model_inputs, on_device
from sft_dist.data.images import ImageBatches
from sft_dist.data.prepare import PreparedData
from sft_dist.modeling.loss import ChunkedTokenLoss, token_loss_sums
from sft_dist.records import LoopState
from sft_dist.storage import Location
from sft_dist.tasks import task_of
from sft_dist.tasks.heads import LossFn
from sft_dist.tools.lr_find import Divergence
from sft_dist.worker import checkpoint, faults
from sft_dist.worker import engine as engine_lib
from sft_dist.worker.evaluate import BestTracker
from sft_dist.worker.health import Health
from sft_dist.worker.runtime import Job, RunContext, all_reduce_sum
from sft_dist.worker.session import Session, is_own, resume_point, set_up, total_steps
from sft_dist.worker.timing import OFF, StepTimer
from sft_dist.worker.train_engine import TrainEngine


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
    loop = Loop.of(session, loop_state, data.fingerprint, stop_on_divergence)
    loop.begin()
    step, reason = loop.start, None
    for step in range(loop.start + 1, loop.steps + 1):  # `step` counts optimizer steps completed after this one
        reason = loop.train(step)
        if reason in ENDING:
            break
    else:
        reason = loop.finish(step)
    ctx.emit({"step": step, "event": "end", "stop_reason": reason, "metric": loop.tracker.metric,
              **loop.tracker.state()})


@dataclass(frozen=True)
class Schedule:
    """When the loop logs and validates (the final validation, with eval.at_end, is the loop's own)."""

    cfg: RunConfig
    plan: BatchPlan
    steps: int

    def logs(self, step: int) -> bool:
        return step % self.cfg.logging.every_steps == 0 or step == self.steps

    def validates(self, step: int) -> bool:
        return validation_due(self.cfg, self.plan, step, self.steps)

    def validates_at_start(self, start: int) -> bool:
        return bool(self.cfg.eval.at_start and start == 0)


@dataclass
class Checkpointer:
    """Every save the loop makes: periodic, just in time (a preemption notice, once), on a stop request, final.
    A non-finite step saves nothing: the newest checkpoint stays the last finite state."""

    session: Session
    tracker: BestTracker
    fingerprint: Any
    steps: int
    saved_steps: list[int]  # a resumed run's checkpoint is a saved state too
    preemption_saved: bool = False

    def after_step(self, step: int, reason: str | None, metrics: dict[str, Any]) -> None:
        # A preemption notice: save once and train on; Ray restarts the run from this checkpoint when the
        # node is gone. A stop request saves whether or not periodic checkpoints are on: it is the only
        # way the run can be continued.
        every = self.session.cfg.checkpoint.every_steps
        just_in_time = reason == "preempted" and not self.preemption_saved and step != self.steps
        periodic = every and step != self.steps and (step % every == 0 or reason == "early_stopping")
        if reason != "non_finite" and (just_in_time or periodic or reason == "stop"):
            self.save(step, metrics)
        self.preemption_saved |= just_in_time

    def final(self, step: int, metrics: dict[str, Any]) -> None:
        if self.session.cfg.checkpoint.every_steps:
            self.save(step, metrics)

    def save(self, step: int, metrics: dict[str, Any]) -> None:  # collective
        cfg, plan = self.session.cfg, self.session.plan
        state = LoopState(step, step * plan.global_batch_size, cfg.seed, step // plan.steps_per_epoch,
                          self.tracker.state(), self.fingerprint, cfg.model_dump(mode="json"))
        score = self.tracker.score(metrics)
        checkpoint.save(self.session.engine, self.session.ctx, state,
                        {"step": step, **metrics, checkpoints.SCORE: checkpoints.UNSCORED if score is None else score},
                        self.session.history)
        self.saved_steps.append(step)


@dataclass
class StopRules:
    """This rank's reason to stop after a step, for `agreed_stop`: early stopping, the range test's divergence
    (lr-find), or a non-finite step (a training run); interruptions come from the runtime."""

    session: Session
    tracker: BestTracker
    divergence: Divergence | None
    health: Health = field(default_factory=Health)

    def judge(self, step: int, train_log: dict[str, Any] | None, loss_sum: float) -> tuple[str | None, str | None]:
        """(this rank's reason or None, what was not finite or None)."""
        divergence, session = self.divergence, self.session
        diverged = divergence is not None and train_log is not None and divergence.update(train_log["loss"])
        # The range test ends on a divergence (above); a training run stops on a non-finite step.
        problem = None if divergence else judge_step(session.ctx, session.cfg, self.health, step, loss_sum,
                                                     session.engine.get_global_grad_norm())
        stopping = "early_stopping" if self.tracker.should_stop() else "diverged" if diverged else None
        return ("non_finite" if problem else stopping), problem


@dataclass
class Loop:
    """The loop's parts: what a step trains on and how it is logged, validated, saved and stopped."""

    session: Session
    start: int
    steps: int
    tracker: BestTracker
    schedule: Schedule
    checkpointer: Checkpointer
    stops: StopRules
    supervised: np.ndarray  # per example, for the global batch's token count
    durations: np.ndarray | None  # per clip, in seconds (the audio tasks): throughput in audio seconds
    timer: StepTimer
    loss_fn: LossFn
    chunked: ChunkedTokenLoss | None
    window: Window = field(default_factory=lambda: Window())

    @classmethod
    def of(cls, session: Session, loop_state: LoopState, fingerprint: Any, stop_on_divergence: bool) -> Loop:
        cfg, ctx, plan = session.cfg, session.ctx, session.plan
        steps, start = total_steps(cfg, plan), loop_state.step
        tracker = BestTracker.for_config(cfg.eval, loop_state.best)
        supervised = np.asarray(session.train_set["num_supervised"])
        durations = np.asarray(session.train_set["duration_s"]) if task_of(cfg).reads_audio else None
        timer = StepTimer(cfg.logging.timing, ctx.device, engine_lib.comm_seconds if cfg.logging.timing else None)
        loss_fn, chunked = task_of(cfg).loss(cfg.train), session.chunked_loss(cfg.train.label_smoothing)
        saver = Checkpointer(session, tracker, fingerprint, steps, [start] if start else [])
        stops = StopRules(session, tracker, Divergence() if stop_on_divergence else None)
        return cls(session, start, steps, tracker, Schedule(cfg, plan, steps), saver, stops, supervised, durations,
                   timer, loss_fn, chunked, Window(audio=durations is not None))

    def begin(self) -> None:
        """The validation before training (eval.at_start, a fresh run); the first log window starts after it."""
        if self.schedule.validates_at_start(self.start):
            self.tracker.update(self.session.validate(0), 0)
        self.window = Window(audio=self.durations is not None)

    def train(self, step: int) -> str | None:
        """One step: train, log, maybe validate, agree whether to stop, maybe save; the agreed reason to stop."""
        session, cfg, ctx = self.session, self.session.cfg, self.session.ctx
        faults.maybe_fail(cfg.debug, ctx.storage, ctx.rank, step)
        loss_sum, tokens, supervised = train_step(session.engine, ctx, session.train_set, session.plan, step - 1,
                                                  self.supervised, session.batches, self.loss_fn, self.timer,
                                                  self.chunked, task_of(cfg).model_loss)
        audio_s = 0.0 if self.durations is None else float(self.durations[session.plan.global_batch(step - 1)].sum())
        self.window.add(loss_sum, tokens, supervised, audio_s)
        faults.pace(cfg.debug)
        train_log = self.train_metrics(step) if self.schedule.logs(step) else None
        if train_log:
            session.emit(train_log)
        metrics = session.validate(step) if self.schedule.validates(step) else {}
        self.tracker.update(metrics, step)
        local_reason, problem = self.stops.judge(step, train_log, loss_sum)
        reason = agreed_stop(ctx, local_reason)
        if reason in ENDING and train_log is None:  # the last step is always in metrics.jsonl
            session.emit(self.train_metrics(step))
        self.checkpointer.after_step(step, reason, metrics)
        if reason == "non_finite":
            message = non_finite_message(step, problem, self.checkpointer.saved_steps)
            ctx.emit({"step": step, "event": "error", "message": message})
        return reason

    def finish(self, step: int) -> str:
        """After the last step: the final validation (eval.at_end) and save; the stop reason."""
        if step > self.start:  # not a resume of a run that had already finished
            metrics = self.session.validate(step) if self.session.cfg.eval.at_end else {}
            self.tracker.update(metrics, step)
            self.checkpointer.final(step, metrics)
        return "max_steps" if self.session.cfg.train.max_steps else "epochs"

    def train_metrics(self, step: int) -> dict[str, Any]:  # collective: the window's loss is all-reduced
        engine, plan = self.session.engine, self.session.plan
        return {"step": step, "epoch": step / plan.steps_per_epoch, "total_steps": self.steps,
                "world_size": self.session.ctx.world_size, **self.window.reduce(),
                "lr": engine.get_lr()[0], **grad_norm(engine), **self.timer.metrics()}


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
    session.validate(loop_state.step)
    ctx.emit({"step": loop_state.step, "event": "end", "stop_reason": "evaluated"})


def train_step(
    engine: TrainEngine, ctx: RunContext, train_set: Any, plan: BatchPlan, step: int, supervised: np.ndarray,
    batches: TextBatches | ImageBatches, loss_fn: LossFn = token_loss_sums, timer: StepTimer = OFF,
    chunked: ChunkedTokenLoss | None = None, model_loss: bool = False,
) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches.

    Returns (this rank's summed loss, this rank's real tokens, the global batch's supervised tokens).
    ("Supervised tokens" are examples for sequence and image classification: the loss is then a mean
    per example; an image counts as one token.) `model_loss`: the model takes the labels and computes
    its own loss, and `loss_fn` takes its outputs (the task's `model_loss`).
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
    for m, indices in enumerate(plan.micro_batches(step, ctx.rank)):
        seed_micro_batch(plan.seed, step, plan.micro_batch_number(m, ctx.rank))
        rows = train_set[[int(i) for i in indices]]
        batch = on_device(batches(rows, indices, step), ctx.device)
        timer.lap("data")
        if chunked:  # the causal LM's loss without the full logits (train.chunked_loss)
            loss_sum, _, _ = chunked(engine, model_inputs(batch), batch["labels"])
        elif model_loss:
            loss_sum, _, _ = loss_fn(engine(**batch), batch["labels"])
        else:
            loss_sum, _, _ = loss_fn(engine(**model_inputs(batch)).logits, batch["labels"])
        timer.lap("forward")
        engine.backward(loss_sum * scale)
        timer.lap("backward")
        engine.step()  # DeepSpeed steps the optimizer and scheduler only at the accumulation boundary
        timer.lap("optimizer")
        loss_total += loss_sum.item()
        tokens += sum(rows["length"])
    return loss_total, tokens, global_tokens


def seed_micro_batch(seed: int, step: int, number: int) -> None:
    """Seed torch's generator (CPU and every GPU) for one micro-batch from the run's seed and the micro-batch's
    place in the global batch, so dropout, LoRA dropout and NEFTune noise depend on which rows are trained at
    which step, never on the rank that trains them or on the draws before. A resume, at the same or another
    world size, then continues the random numbers exactly: per-rank generator states saved in a checkpoint
    could not be split or merged when an elastic run changes its world size."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, number]).generate_state(1, np.uint64)[0]))


@dataclass
class Window:
    """Training totals since the last log line, all-reduced when logged."""

    audio: bool = False  # the rows are clips: throughput in audio seconds per second too
    loss_sum: float = 0.0
    tokens: float = 0.0
    supervised: float = 0.0
    audio_s: float = 0.0
    started_s: float = field(default_factory=time.perf_counter)

    def add(self, loss_sum: float, tokens: float, global_supervised: int, global_audio_s: float = 0.0) -> None:
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.supervised += global_supervised
        self.audio_s += global_audio_s

    def reduce(self) -> dict[str, float]:
        """Collective: the window's token-weighted loss and tokens/s over all ranks; then resets."""
        loss_sum, tokens = all_reduce_sum(torch.tensor([self.loss_sum, self.tokens], dtype=torch.float64)).tolist()
        elapsed_s = time.perf_counter() - self.started_s
        # `supervised` and `audio_s` are already global: every rank added the same global batch's.
        metrics = {"loss": loss_sum / self.supervised, "tokens_per_s": tokens / elapsed_s}
        if self.audio:
            metrics["audio_s_per_s"] = self.audio_s / elapsed_s
        self.loss_sum = self.tokens = self.supervised = self.audio_s = 0.0
        self.started_s = time.perf_counter()
        return metrics


def grad_norm(engine: TrainEngine) -> dict[str, float]:
    norm = engine.get_global_grad_norm()
    return {} if norm is None else {"grad_norm": float(norm)}
