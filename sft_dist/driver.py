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
import platform
import signal
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sft_dist import config as config_lib
from sft_dist import fingerprint, inputs, sinks
from sft_dist.atomic_files import write_text
from sft_dist.config import ModelConfig, RunConfig
from sft_dist.errors import UserError
from sft_dist.storage import Location, StorageError, check_reachable, run_location
from sft_dist.tasks import task_of

if TYPE_CHECKING:
    from sft_dist.data.prepare import PreparedData
    from sft_dist.metrics import RunRecorder
    from sft_dist.runtime import Job


def load_checked(config_path: str, overrides: list[str], *, fresh_run: bool = True, needs_weights: bool = True,
                 continuing: bool = False) -> RunConfig:
    """The config, validated, its inputs checked (sft_dist.inputs), label names filled in. `fresh_run`:
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
    from sft_dist import adapters
    from sft_dist.data.batches import BatchPlan
    from sft_dist.data.prepare import prepare, row_lengths
    from sft_dist.data.stats import batching_stats, warnings

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
    from sft_dist.model import load_tokenizer

    try:
        return load_tokenizer(model)
    except (OSError, ValueError, TypeError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the tokenizer of {model.name_or_path}: {first}",
                        key="model.name_or_path") from None


def create_run_dir(cfg: RunConfig, continuing: bool = False) -> Path:
    run_dir = cfg.run_dir()
    if not continuing:  # checked before the data too; again here, in case a run took the name meanwhile
        inputs.check_run_folder_free(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", config_lib.dump(cfg))
    write_text(run_dir / "environment.json", json.dumps(environment(), indent=2))
    return run_dir


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
    from sft_dist import checkpoint, safe_loading

    where = run_location(cfg.storage_path(), cfg.run_name) if resume == "auto" else Location.of(resume, key="--resume")
    try:
        folders = [where] if checkpoint.NAME.search(where.name) else checkpoint.complete_checkpoints(where)
        reason = checkpoint.problem(folders[-1]) if folders else "no complete checkpoint"
    except StorageError as err:
        raise UserError(str(err), key="--resume") from None
    if reason:
        raise UserError(f"cannot resume from {where}: {reason}", key="--resume")
    chosen = folders[-1]
    if not chosen.is_remote:
        safe_loading.refuse_unsafe(chosen.local_path())
    changed = fingerprint.changed_keys(checkpoint.read_manifest(chosen)["fingerprint"], current)
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
    from sft_dist import checkpoint

    # A driver on a fresh machine (a new head pod) has no run folder, but an object store may hold the
    # run's checkpoints: the run goes on from them in a new run folder.
    in_store = Location.of(cfg.storage_path()).is_remote and checkpoint.complete_checkpoints(
        run_location(cfg.storage_path(), cfg.run_name), log=lambda _: None)
    if not cfg.run_dir().is_dir() and not in_store:
        raise UserError(f"no run folder {cfg.run_dir()} to resume", key="run_name")
    return cfg


def connect_to_ray(cfg: RunConfig) -> None:
    """Join the cluster (refusing storage its nodes cannot share), or start an embedded one that ends
    with this process, before the run folder exists."""
    from sft_dist import launcher  # Ray is imported only once the input is known to be good

    launcher.connect(cfg)


def fit_on_ray(cfg: RunConfig, data: PreparedData, recorder: RunRecorder, job: Job) -> str | None:
    from sft_dist import launcher

    with stop_on_sigterm() as stop:  # after connecting: Ray's core worker installs a SIGTERM handler of its own
        return launcher.fit(cfg, data, recorder.record, job, stop)


def fit_in_process(cfg: RunConfig, data: PreparedData, recorder: RunRecorder, job: Job) -> str | None:
    """The same loop in this one process, without Ray: for debugging, benchmarks and GPU checks."""
    from sft_dist import runtime

    with stop_on_sigterm() as stop:
        from sft_dist import checkpoint

        storage = run_location(cfg.storage_path(), cfg.run_name)
        ctx = runtime.local_context(cfg.ray.use_gpu, cfg.ray.threads_per_worker, recorder.record, storage, stop,
                                    functools.partial(checkpoint.prune, storage, cfg.checkpoint.keep))
        from sft_dist import train as train_loop  # after local_context: DeepSpeed reads DS_ACCELERATOR on import

        try:
            train_loop.run_job(ctx, cfg, data, job)
        except Exception as err:  # the run started: report it as a failed run (exit 1), with its cause
            return f"rank {ctx.rank}: {type(err).__name__}: {err}"
    return None


@contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """SIGTERM (`ray job stop`, `scancel`, a node shutting down) sets the event: the workers finish their
    step, save a checkpoint and stop, and the run can be continued with --resume auto."""
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        if not stop.is_set():
            print("SIGTERM: finishing the current step, saving a checkpoint, then stopping", flush=True)
        stop.set()

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def environment() -> dict[str, Any]:
    """Versions and command line: with config.yaml, enough to reproduce the run."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("sft_dist", "torch", "deepspeed", "transformers", "peft", "ray", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "argv": sys.argv, "versions": versions}


def train(config_path: str, overrides: list[str], use_ray: bool = True, resume: str | None = None) -> int:
    if not use_ray:
        overrides = [*overrides, "ray.num_workers=1"]
    continuing = resume == "auto"
    cfg = load_checked(config_path, overrides, continuing=continuing)
    data = prepare_data(cfg, use_ray)
    resume_from = resume_checkpoint(cfg, resume, data.fingerprint) if resume else None
    if use_ray:
        connect_to_ray(cfg)
    run_dir = create_run_dir(cfg, continuing=continuing)
    print(f"run folder: {run_dir}", flush=True)
    from sft_dist import plots
    from sft_dist.metrics import RunRecorder
    from sft_dist.runtime import Job

    recorder = RunRecorder(run_dir, sinks=sinks.open_sinks(cfg, run_dir))
    fit = fit_on_ray if use_ray else fit_in_process
    error = fit(cfg, data, recorder, Job(resume_from=resume_from or None))
    # A worker's own account (a timed-out validation, a non-finite loss) first; a record the driver
    # could not write (a full disk) fails the run too.
    error = recorder.worker_error() or error or recorder.write_error
    summary = recorder.summary(data.stats, error, best_checkpoint(cfg))
    not_written = write_record(run_dir / "summary.json", json.dumps(summary, indent=2))
    plots.plot_run(run_dir)
    recorder.close(summary["status"])
    print(recorder.before_after())
    if error or not_written:
        print(f"error: training failed: {'; '.join(filter(None, (error, not_written)))}", file=sys.stderr)
        return 1
    if summary["status"] == "stopped":
        print(f"stopped at step {summary['steps']} with a checkpoint; continue with --resume auto "
              f"--set run_name={cfg.run_name}", flush=True)
        return STOPPED_EXIT
    if cfg.checkpoint.export_at_end:  # the run's own model: its own trust_remote_code
        export_checkpoint(run_location(cfg.storage_path(), cfg.run_name), run_dir / "model",
                          trust_remote_code=cfg.model.trust_remote_code)
    print(f"done: {summary['steps']} steps ({summary['stop_reason']}); summary in {run_dir / 'summary.json'}")
    return 0


STOPPED_EXIT = 143  # 128 + SIGTERM: what a shell reports for a process that SIGTERM ended


def write_record(path: Path, text: str) -> str | None:
    """Write one of the run's own files whole (or keep the previous one); why not, if it cannot be."""
    try:
        write_text(path, text)
    except OSError as err:
        return f"{path.name} not written ({err.strerror or err})"
    return None


def best_checkpoint(cfg: RunConfig) -> dict[str, Any] | None:
    """The run's checkpoint with the best validation metric: its path (or URI), step and metric value."""
    from sft_dist import checkpoint

    found = checkpoint.complete_checkpoints(run_location(cfg.storage_path(), cfg.run_name), log=lambda _: None)
    best = checkpoint.best(found)
    if best is None:
        return None
    manifest = checkpoint.read_manifest(best)
    return {"path": str(best), "step": manifest["step"], cfg.eval.metric: manifest["metrics"].get(cfg.eval.metric)}


def evaluate(config_path: str, overrides: list[str], source: str, use_ray: bool = True) -> int:
    """`sft-dist eval`: validate a checkpoint as the run would, with the config's workers."""
    if not use_ray:
        overrides = [*overrides, "ray.num_workers=1"]
    cfg = load_checked(config_path, [*overrides, "checkpoint.every_steps=null", "checkpoint.export_at_end=false"],
                       fresh_run=False)
    cfg = cfg.model_copy(update={"run_name": f"eval-{cfg.run_name}"})
    inputs.check_run_folder_free(cfg)
    from sft_dist import checkpoint
    from sft_dist.runtime import Job

    folder = checkpoint.choose(source)
    data = prepare_data(cfg, use_ray)
    changed = [k for k in fingerprint.changed_keys(checkpoint.read_manifest(folder)["fingerprint"], data.fingerprint)
               if k in ("model", "peft")]
    if changed:
        raise UserError(f"the checkpoint {folder} was trained with another {', '.join(changed)}", key=changed[0])
    run_dir, recorder, error = side_run(cfg, data, use_ray, Job(kind="eval", checkpoint=str(folder)),
                                        f"evaluating {folder}")
    if error:
        print(f"error: evaluation failed: {error}", file=sys.stderr)
        return 1
    result = {"checkpoint": str(folder), **(recorder.evals[-1] if recorder.evals else {})}
    not_written = write_record(run_dir / "eval.json", json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    if not_written:
        print(f"error: {not_written}", file=sys.stderr)
        return 1
    return 0


def side_run(cfg: RunConfig, data: PreparedData, use_ray: bool, job: Job, describe: str
             ) -> tuple[Path, RunRecorder, str | None]:
    """A short run beside training (`eval`, `lr-find`) in a run folder of its own: the folder, what the
    workers recorded, and the error if the run failed."""
    from sft_dist.metrics import RunRecorder

    if use_ray:
        connect_to_ray(cfg)
    run_dir = create_run_dir(cfg)
    print(f"{describe}; run folder: {run_dir}", flush=True)
    recorder = RunRecorder(run_dir)
    error = (fit_on_ray if use_ray else fit_in_process)(cfg, data, recorder, job)
    return run_dir, recorder, recorder.worker_error() or error


def find_learning_rate(config_path: str, overrides: list[str], lr_min: float, lr_max: float, steps: int,
                       use_ray: bool = True) -> int:
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
    from sft_dist import lr_find
    from sft_dist.runtime import Job

    run_dir, recorder, error = side_run(cfg, prepare_data(cfg, use_ray), use_ray, Job(kind="lr_find"),
                                        f"learning-rate range test, {lr_min:g} -> {lr_max:g} over {steps} steps")
    if error:
        print(f"error: the range test failed: {error}", file=sys.stderr)
        return 1
    losses = [e["loss"] for e in recorder.train_events()]
    # The loss logged at step s was made with the learning rate of step s (the schedule's value at s-1).
    lrs = [lr_min * (lr_max / lr_min) ** (i / max(1, steps - 1)) for i in range(len(losses))]
    found = lr_find.suggestions(lrs, losses)
    plot = lr_find.plot(lrs, losses, found, run_dir / "lr_find.png")
    result = {"suggested_lr": found["steepest"], **found, "steps_run": len(losses),
              "diverged": recorder.end.get("stop_reason") == "diverged", "plot": str(plot)}
    not_written = write_record(run_dir / "lr_find.json", json.dumps(result, indent=2))
    if not_written:
        print(f"error: {not_written}", file=sys.stderr)
        return 1
    print(f"suggested learning rate: {found['steepest']:.2e} (steepest descent); "
          f"{found['minimum_over_10']:.2e} (minimum / 10); plot: {plot}", flush=True)
    return 0


def export_checkpoint(source: str | Location, out: Path, dtype: str = "fp32", merge_lora: bool = False,
                      trust_remote_code: bool = False) -> None:
    """`sft-dist export`, and `checkpoint.export_at_end`: a checkpoint (a folder or a URI, or a run's
    folder or URI: its best, else its latest) as a Hugging Face folder. A checkpoint in an object store
    is downloaded whole first (consolidation reads every rank's files), then exported as a local one.
    The checkpoint's own config never switches trust_remote_code on: only the command (or the run) does."""
    from sft_dist import checkpoint, runtime

    folder = checkpoint.choose(source)
    # Consolidation is CPU work here, whatever the workers used.
    runtime.configure_worker(use_gpu=False, threads=len(os.sched_getaffinity(0)))
    from sft_dist import export  # after configure_worker: DeepSpeed reads DS_ACCELERATOR on import

    with checkpoint.local_copy(folder) as local:
        _, usage = export.export(local, out, dtype, merge_lora, origin=str(folder),
                                 trust_remote_code=trust_remote_code)
    print(f"exported {folder} -> {out}\n{usage}", flush=True)
