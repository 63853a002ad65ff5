"""What the driver does for `sft-dist train`: everything that can fail on bad input happens here,
before Ray starts (config, output and run folders, model folder, hub, data); then the launch, then the
summary.

Heavy libraries (torch, transformers, datasets, DeepSpeed, Ray) are imported inside the functions that
use them, once the config and the inputs are known to be good: a typo is reported in a fraction of the
time `import torch` takes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_dist import config as config_lib
from sft_dist import fingerprint
from sft_dist.atomic_files import write_text
from sft_dist.config import ModelConfig, RunConfig
from sft_dist.driver import inputs, sinks
from sft_dist.driver.launch_path import launch
from sft_dist.errors import Exit, UserError
from sft_dist.storage import Location, StorageError, check_reachable, run_location
from sft_dist.tasks import task_of

if TYPE_CHECKING:
    from sft_dist.data.prepare import PreparedData


def load_checked(config_path: str, overrides: list[str], *, fresh_run: bool = True, needs_weights: bool = True,
                 continuing: bool = False) -> RunConfig:
    """The config, validated, its inputs checked (sft_dist.driver.inputs), label names filled in. `fresh_run`:
    the run folder must be free; `continuing`: the run to continue (--resume auto)."""
    cfg = config_lib.load(config_path, overrides, name_run=not continuing)
    check_storage(cfg)
    if continuing:
        cfg = run_to_continue(cfg, config_path)
    inputs.check(cfg, fresh_run=fresh_run and not continuing, needs_weights=needs_weights)
    sinks.check_installed(cfg.logging)
    from sft_dist.data.labels import with_labels  # reads the training data's label names

    return with_labels(cfg)


def prepare_data(cfg: RunConfig, use_ray: bool = True) -> PreparedData:
    """Validate and tokenize the data (cached under output_dir), and refuse a run with no steps; first
    check the adapter config against the installed peft, which the config alone cannot."""
    from sft_dist.data.batches import BatchPlan
    from sft_dist.data.prepare import prepare, row_lengths
    from sft_dist.data.stats import batching_stats, warnings
    from sft_dist.modeling import adapters

    if adapters.enabled(cfg.peft):
        adapters.check(cfg.peft, cfg.model, zero3=cfg.deepspeed.stage == 3)
    tokenizer = text_tokenizer(cfg.model) if task_of(cfg).needs_tokenizer else None
    data = prepare(cfg.data, cfg.eval, tokenizer, Path(cfg.output_dir) / ".cache" / "data", cfg.model.labels)
    t = cfg.train
    lengths = row_lengths(data.train_dir)
    plan = BatchPlan(len(lengths), t.micro_batch_size, t.grad_accum, cfg.ray.max_workers, cfg.seed,
                     lengths if cfg.data.group_by_length else None)
    if plan.steps_per_epoch == 0:
        rows = "packed rows" if cfg.data.packing else "examples"
        workers = "ray.num_workers" if use_ray else "1 process (--no-ray)"
        raise UserError(
            f"{plan.num_examples} usable training {rows} are fewer than one global batch of "
            f"{plan.global_batch_size} (train.micro_batch_size x train.grad_accum x {workers})",
            key="data.train",
        )
    for line in warnings(data.stats):
        print(f"warning: {line}", flush=True)
    train_stats = {**data.stats["train"], "batching": batching_stats(plan, lengths)}
    return dataclasses.replace(data, stats={**data.stats, "train": train_stats},
                               fingerprint=fingerprint.resume_fingerprint(cfg, data.source_digests))


def text_tokenizer(model: ModelConfig) -> Any:
    """The model's tokenizer; one that cannot load is a bad model folder or name, in one line."""
    from sft_dist.modeling.model import load_tokenizer

    try:
        return load_tokenizer(model)
    except (OSError, ValueError, TypeError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the tokenizer of {model.name_or_path}: {first}",
                        key="model.name_or_path") from None


def check_storage(cfg: RunConfig) -> None:
    """An object store that cannot be written (wrong endpoint, no bucket, no credentials) is refused naming
    ray.storage_path, before any data is prepared or Ray starts."""
    root = Location.of(cfg.storage_path())
    check_reachable(root, f".sft_dist_probe-{uuid.uuid4().hex}", key="ray.storage_path" if cfg.ray.storage_path
                    else "output_dir")


def resume_checkpoint(cfg: RunConfig, resume: str, current: dict[str, Any]) -> str:
    """The complete checkpoint that `--resume auto|PATH` names, after checking that the run's fingerprint
    (`current`) still fits it and that loading it cannot run code. Local folders and object stores are
    scanned alike (a checkpoint in a store is checked in the local copy each rank loads)."""
    from sft_dist import checkpoints, safe_loading

    where = run_location(cfg.storage_path(), cfg.run_name) if resume == "auto" else Location.of(resume, key="--resume")
    try:
        folders = [where] if checkpoints.NAME.search(where.name) else checkpoints.complete_checkpoints(where)
        reason = checkpoints.problem(folders[-1]) if folders else "no complete checkpoint"
    except StorageError as err:
        raise UserError(str(err), key="--resume") from None
    if reason:
        raise UserError(f"cannot resume from {where}: {reason}", key="--resume")
    chosen = folders[-1]
    if not chosen.is_remote:
        safe_loading.refuse_unsafe(chosen.local_path())
    changed = fingerprint.changed_keys(checkpoints.read_manifest(chosen).loop.fingerprint, current)
    if changed:
        raise UserError(f"the config changed in keys that a resume cannot follow: {', '.join(changed)} "
                        f"(checkpoint {chosen}); revert them or start a new run", key="--resume")
    print(f"resuming from {chosen}", flush=True)
    return str(chosen)


def run_to_continue(cfg: RunConfig, config_path: str) -> RunConfig:
    """`--resume auto` continues the run named by run_name, else the newest run of this config."""
    if cfg.run_name is None:
        runs = sorted(Path(cfg.output_dir).glob(f"{Path(config_path).stem}-*"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise UserError(f"no earlier run of {config_path} in {cfg.output_dir} to resume", key="--resume")
        cfg = cfg.model_copy(update={"run_name": runs[-1].name})
    from sft_dist import checkpoints

    # A driver on a fresh machine (a new head pod) has no run folder, but an object store may hold the
    # run's checkpoints: the run goes on from them in a new run folder.
    in_store = Location.of(cfg.storage_path()).is_remote and checkpoints.complete_checkpoints(
        run_location(cfg.storage_path(), cfg.run_name), log=lambda _: None)
    if not cfg.run_dir().is_dir() and not in_store:
        raise UserError(f"no run folder {cfg.run_dir()} to resume", key="run_name")
    return cfg


def train(config_path: str, overrides: list[str], use_ray: bool = True, resume: str | None = None) -> Exit:
    if not use_ray:
        overrides = [*overrides, "ray.num_workers=1"]
    continuing = resume == "auto"
    cfg = load_checked(config_path, overrides, continuing=continuing)
    data = prepare_data(cfg, use_ray)
    resume_from = resume_checkpoint(cfg, resume, data.fingerprint) if resume else None
    from sft_dist.driver import plots
    from sft_dist.worker.runtime import Job

    run = launch(cfg, data, Job(resume_from=resume_from or None), use_ray=use_ray, continuing=continuing,
                 sinks=functools.partial(sinks.open_sinks, cfg))
    summary = run.recorder.summary(data.stats, run.error, best_checkpoint(cfg))
    not_written = write_record(run.run_dir / "summary.json", json.dumps(summary, indent=2))
    plots.plot_run(run.run_dir)
    run.recorder.close(summary["status"])
    print(run.recorder.before_after())
    if run.error or not_written:
        print(f"error: training failed: {'; '.join(filter(None, (run.error, not_written)))}", file=sys.stderr)
        return Exit.FAILED
    if run.stopped:
        print(f"stopped at step {summary['steps']} with a checkpoint; continue with --resume auto "
              f"--set run_name={cfg.run_name}", flush=True)
        return Exit.STOPPED
    if cfg.checkpoint.export_at_end:  # the run's own model: its own trust_remote_code
        export_checkpoint(run_location(cfg.storage_path(), cfg.run_name), run.run_dir / "model",
                          trust_remote_code=cfg.model.trust_remote_code)
    print(f"done: {summary['steps']} steps ({summary['stop_reason']}); summary in {run.run_dir / 'summary.json'}")
    return Exit.OK


def write_record(path: Path, text: str) -> str | None:
    """Write one of the run's own files whole (or keep the previous one); why not, if it cannot be."""
    try:
        write_text(path, text)
    except OSError as err:
        return f"{path.name} not written ({err.strerror or err})"
    return None


def best_checkpoint(cfg: RunConfig) -> dict[str, Any] | None:
    """The run's checkpoint with the best validation metric: its path (or URI), step and metric value."""
    from sft_dist import checkpoints

    found = checkpoints.complete_checkpoints(run_location(cfg.storage_path(), cfg.run_name), log=lambda _: None)
    best = checkpoints.best(found)
    if best is None:
        return None
    manifest = checkpoints.read_manifest(best)
    return {"path": str(best), "step": manifest.step, cfg.eval.metric: manifest.metrics.get(cfg.eval.metric)}


def evaluate(config_path: str, overrides: list[str], source: str, use_ray: bool = True) -> Exit:
    """`sft-dist eval`: validate a checkpoint as the run would, with the config's workers."""
    if not use_ray:
        overrides = [*overrides, "ray.num_workers=1"]
    cfg = load_checked(config_path, [*overrides, "checkpoint.every_steps=null", "checkpoint.export_at_end=false"],
                       fresh_run=False)
    cfg = cfg.model_copy(update={"run_name": f"eval-{cfg.run_name}"})
    inputs.check_run_folder_free(cfg)
    from sft_dist import checkpoints
    from sft_dist.worker.runtime import Job

    folder = checkpoints.choose(source)
    data = prepare_data(cfg, use_ray)
    changed = [k for k in fingerprint.changed_keys(checkpoints.read_manifest(folder).loop.fingerprint, data.fingerprint)
               if k in ("model", "peft")]
    if changed:
        raise UserError(f"the checkpoint {folder} was trained with another {', '.join(changed)}", key=changed[0])
    run = launch(cfg, data, Job(kind="eval", checkpoint=str(folder)), use_ray=use_ray,
                 describe=f"evaluating {folder}")
    if run.error:
        print(f"error: evaluation failed: {run.error}", file=sys.stderr)
        return Exit.FAILED
    result = {"checkpoint": str(folder), **(run.recorder.evals[-1].to_json() if run.recorder.evals else {})}
    not_written = write_record(run.run_dir / "eval.json", json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    if not_written:
        print(f"error: {not_written}", file=sys.stderr)
        return Exit.FAILED
    return Exit.OK


def find_learning_rate(config_path: str, overrides: list[str], lr_min: float, lr_max: float, steps: int,
                       use_ray: bool = True) -> Exit:
    """`sft-dist lr-find`: the LR range test as its own short run (no checkpoints, no validation)."""
    if not 0 < lr_min < lr_max:
        raise UserError(f"--lr-min ({lr_min}) must be positive and below --lr-max ({lr_max})", key="--lr-min")
    sweep = [f"train.max_steps={steps}", f"train.lr={lr_min}", "train.scheduler=exponential",
             f"train.scheduler_kwargs={{end_lr: {lr_max}}}", "train.warmup_ratio=0", "train.warmup_steps=null",
             "checkpoint.every_steps=null", "checkpoint.export_at_end=false", "eval.at_start=false",
             "eval.at_end=false", "eval.every_steps=null", "eval.at_epoch_end=false", "eval.early_stopping=null",
             "eval.generate=null", "logging.every_steps=1", "debug.fail_at_step=null"]
    cfg = load_checked(config_path, [*overrides, *sweep, *([] if use_ray else ["ray.num_workers=1"])], fresh_run=False)
    cfg = cfg.model_copy(update={"run_name": f"lr-find-{cfg.run_name}"})
    inputs.check_run_folder_free(cfg)
    from sft_dist.tools import lr_find
    from sft_dist.worker.runtime import Job

    run = launch(cfg, prepare_data(cfg, use_ray), Job(kind="lr_find"), use_ray=use_ray,
                 describe=f"learning-rate range test, {lr_min:g} -> {lr_max:g} over {steps} steps")
    run_dir, recorder = run.run_dir, run.recorder
    if run.error:
        print(f"error: the range test failed: {run.error}", file=sys.stderr)
        return Exit.FAILED
    losses = [r.loss for r in recorder.train_records()]
    # The loss logged at step s was made with the learning rate of step s (the schedule's value at s-1).
    lrs = [lr_min * (lr_max / lr_min) ** (i / max(1, steps - 1)) for i in range(len(losses))]
    found = lr_find.suggestions(lrs, losses)
    plot = lr_find.plot(lrs, losses, found, run_dir / "lr_find.png")
    result = {"suggested_lr": found["steepest"], **found, "steps_run": len(losses),
              "diverged": recorder.end.get("stop_reason") == "diverged", "plot": str(plot)}
    not_written = write_record(run_dir / "lr_find.json", json.dumps(result, indent=2))
    if not_written:
        print(f"error: {not_written}", file=sys.stderr)
        return Exit.FAILED
    print(f"suggested learning rate: {found['steepest']:.2e} (steepest descent); "
          f"{found['minimum_over_10']:.2e} (minimum / 10); plot: {plot}", flush=True)
    return Exit.OK


def export_checkpoint(source: str | Location, out: Path, dtype: str = "fp32", merge_lora: bool = False,
                      trust_remote_code: bool = False) -> None:
    """`sft-dist export`, and `checkpoint.export_at_end`: a checkpoint (a folder or a URI, or a run's
    folder or URI: its best, else its latest) as a Hugging Face folder. A checkpoint in an object store
    is downloaded whole first (consolidation reads every rank's files), then exported as a local one.
    The checkpoint's own config never switches trust_remote_code on: only the command (or the run) does."""
    from sft_dist import checkpoints
    from sft_dist.worker import runtime

    folder = checkpoints.choose(source)
    # Consolidation is CPU work here, whatever the workers used.
    runtime.configure_worker(use_gpu=False, threads=len(os.sched_getaffinity(0)))
    from sft_dist.tools import export

    with checkpoints.local_copy(folder) as local:
        _, usage = export.export(local, out, dtype, merge_lora, origin=str(folder),
                                 trust_remote_code=trust_remote_code)
    print(f"exported {folder} -> {out}\n{usage}", flush=True)
