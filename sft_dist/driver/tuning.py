"""`sft-dist tune CONFIG --space SPACE.yaml`: hyperparameter search with Ray Tune, each trial a full
distributed sft_dist run (its own Ray Train workers, checkpoints and run folder), judged by the
coordinated validation's metric and cut short by ASHA.

Driver-side Ray, like `launcher`: the only other module that imports `ray` on the driver. The trial
function runs the launcher in a thread and reports each validation to Tune from the trial's own
thread, which is where `ray.tune.report` belongs.
"""

from __future__ import annotations

import json
import math
import queue
import shlex
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from sft_dist import atomic_files
from sft_dist import config as config_lib
from sft_dist.errors import Exit, UserError
from sft_dist.records import EvalRecord, TrainRecord

TRIAL_CPU = 0.01  # a trial itself only waits on its run, whose workers ask for their own resources
DOMAINS = {
    "uniform": lambda a: tune.uniform(*a),
    "loguniform": lambda a: tune.loguniform(*a),
    "randint": lambda a: tune.randint(*a),
    "choice": lambda a: tune.choice(a),
    "grid": lambda a: tune.grid_search(a),
}


class AshaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, gt=0)  # validations before a trial can be stopped
    reduction_factor: float = Field(2, gt=1)


class SearchSpace(BaseModel):
    """The `--space` file: which config keys to vary, how, and how trials are judged and run."""

    model_config = ConfigDict(extra="forbid")
    params: dict[str, dict[Literal["uniform", "loguniform", "randint", "choice", "grid"], list[Any]]]
    fixed: dict[str, Any] = Field(default_factory=dict)  # config keys set for every trial (e.g. eval cadence)
    metric: str | None = None  # default: the config's eval.metric
    mode: Literal["min", "max"] | None = None  # default: the config's eval.mode
    num_samples: int = Field(1, gt=0)  # per grid point
    max_concurrent_trials: int | None = Field(None, gt=0)  # default: as many as the cluster's CPUs/GPUs fit
    searcher: Literal["random", "optuna"] = "random"  # optuna: TPE (`pip install 'sft_dist[tune]'`)
    # Configs tried first, in order, before the searcher's own picks (each sets every key of params).
    start_with: list[dict[str, Any]] = Field(default_factory=list)
    asha: AshaConfig | None = AshaConfig()


def load_space(path: str) -> SearchSpace:
    try:
        raw = yaml.safe_load(Path(path).read_text())
        space = SearchSpace.model_validate(raw)
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read the search space: {err}", file=path) from None
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(first["msg"], file=path, key=".".join(map(str, first["loc"]))) from None
    for key, domain in space.params.items():
        if len(domain) != 1:
            raise UserError("give exactly one of uniform, loguniform, randint, choice, grid", file=path, key=key)
        if "grid" in domain and space.searcher == "optuna":
            raise UserError("grid needs searcher: random (Optuna samples; use choice)", file=path, key=key)
    for i, point in enumerate(space.start_with):
        if any("grid" in domain for domain in space.params.values()):  # each point would replace a whole grid
            raise UserError("start_with needs a space without grid (a grid tries every point of its own)",
                            file=path, key="start_with")
        if set(point) != set(space.params):
            raise UserError(f"give a value for each key of params: {', '.join(space.params)}",
                            file=path, key=f"start_with.{i}")
    return space


def tune_command(config_path: str, overrides: list[str], space_path: str, resume: bool) -> Exit:
    from sft_dist.driver import commands, launcher

    space = load_space(space_path)
    # Resolved and checked once here, as `train` does (absolute paths, inputs, storage, label names):
    # trials start in Tune's trial folders, from the base config this writes.
    base = commands.load_checked(config_path, [*overrides, *as_overrides(space.fixed)], fresh_run=False)
    for key in space.params:  # each searched key must be a key of the config
        _check_key(base, key)
    experiment = Path(base.output_dir) / f"tune-{Path(config_path).stem}-{Path(space_path).stem}"
    metric = space.metric or base.eval.metric
    mode = space.mode or (base.eval.direction() if metric == base.eval.metric else "min")
    _check_installed(space, space_path)
    _check_resume(experiment, resume)
    commands.prepare_data(base)  # tokenize once, before any trial: trials find the cache
    # An embedded Ray is sized by the worker count: room for the wanted number of concurrent runs.
    wanted = base.ray.max_workers * (space.max_concurrent_trials or 1) + 1
    launcher.connect(base.model_copy(update={"ray": base.ray.model_copy(update={"num_workers": wanted})}))
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPU})
    if resume:  # Tune's saved state: trials, their results, the searcher's and ASHA's state
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = _new_tuner(trainable, space, base, experiment, metric, mode)
    results = tuner.fit()
    print(trial_table(results, metric, list(space.params), validations(base)))
    finished = sum(1 for result in results if ended(result))
    if finished < num_trials(space):  # Ctrl+C: Tune saved the search's state and stopped its trials
        command = ["sft-dist", "tune", config_path, "--space", space_path,
                   *[a for o in overrides for a in ("--set", o)], "--resume"]
        print(f"the search was interrupted ({finished} of {num_trials(space)} trials finished; its state is in "
              f"{experiment}); continue it with:\n  {shlex.join(command)}", file=sys.stderr)
        return Exit.FAILED
    best = results.get_best_result(metric, mode, scope="all")
    print(f"best: {metric} {best.metrics.get(metric)} with " +
          " ".join(f"{k}={v}" for k,
                   v in best.config["params"].items()) + f" (run folder {best.metrics.get('run_dir')})")
    return Exit.OK


def _new_tuner(trainable: Any, space: SearchSpace, base: Any, experiment: Path, metric: str, mode: str) -> tune.Tuner:
    base_file = experiment.with_suffix(".config.yaml")  # what every trial loads, with its values on top
    base_file.parent.mkdir(parents=True, exist_ok=True)
    base_file.write_text(config_lib.dump(base.model_copy(update={"run_name": None})))
    return tune.Tuner(
        trainable,
        param_space={"base": str(base_file), "metric": metric,
                     "params": {k: DOMAINS[kind](args) for k, d in space.params.items() for kind, args in d.items()}},
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=space.num_samples, scheduler=_asha(space, base),
            search_alg=_searcher(space, base.seed, concurrent_trials(space, base)),
            trial_dirname_creator=trial_folder_name),
        run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent)),
    )


def _check_resume(experiment: Path, resume: bool) -> None:
    saved = tune.Tuner.can_restore(str(experiment))
    if resume and not saved:
        raise UserError(f"no search to resume in {experiment}", key="--resume")
    if saved and not resume:  # never mix two searches' trials in one experiment
        raise UserError(f"a search already ran in {experiment}: add --resume to continue it, or remove that "
                        "folder to start a new one", key="--space")


def num_trials(space: SearchSpace) -> int:
    """Trials in the whole search: num_samples for each grid point (Tune's own count)."""
    points = math.prod(len(d["grid"]) for d in space.params.values() if "grid" in d)
    return space.num_samples * points


def trial_folder_name(trial: Any) -> str:
    return f"trial-{trial.trial_id}"  # Tune's default spells out every config value, paths included


def as_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]  # JSON is YAML: null stays null


def _check_key(base: Any, key: str) -> None:
    node = base.model_dump()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError("not a config key", key=key)
        node = node[part]


def concurrent_trials(space: SearchSpace, base: Any) -> int:
    """As many trials at once as the cluster holds whole worker groups, at most the space's limit."""
    import ray

    per_worker = dict(base.ray.resources_per_worker or {"CPU": 1})
    if base.ray.use_gpu:
        per_worker.setdefault("GPU", 1)
    available = ray.cluster_resources()
    need = {r: n * base.ray.max_workers + (TRIAL_CPU if r == "CPU" else 0) for r, n in per_worker.items() if n > 0}
    fits = min(int(available.get(r, 0) // n) for r, n in need.items())
    return max(1, min(fits, space.max_concurrent_trials or fits))


def _asha(space: SearchSpace, base: Any) -> ASHAScheduler | None:
    if space.asha is None:
        return None
    # Tune's clock is the number of validations reported.
    return ASHAScheduler(time_attr="training_iteration", max_t=max(validations(base), space.asha.grace_period),
                         grace_period=space.asha.grace_period, reduction_factor=space.asha.reduction_factor)


def validations(base: Any) -> int:
    """How many validations a full run reports (at the start, every eval.every_steps, at the end)."""
    steps = base.train.max_steps or 1
    periodic = (steps - 1) // base.eval.every_steps if base.eval.every_steps else 0
    return int(base.eval.at_start) + periodic + int(base.eval.at_end)


def _check_installed(space: SearchSpace, path: str) -> None:
    """Before Ray starts: a missing optuna is a setup error (Ray's OptunaSearch imports without it)."""
    if space.searcher == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError("searcher optuna is not installed: pip install 'sft_dist[tune]'", file=path,
                            key="searcher") from None


def _searcher(space: SearchSpace, seed: int, concurrent: int) -> Any:
    """Tune's search algorithm, seeded by the config's seed, running at most `concurrent` trials at once;
    the space's start_with points go first. Tune converts the param_space's domains into the searcher's
    own (Optuna's distributions)."""
    if space.searcher == "random":  # Tune's own: grid points expanded, other domains sampled
        return BasicVariantGenerator(points_to_evaluate=[{"params": p} for p in space.start_with] or None,
                                     max_concurrent=concurrent, random_state=seed)
    from ray.tune.search.optuna import OptunaSearch

    # Optuna names each parameter by its flattened path in the param_space
    points = [{f"params/{k}": v for k, v in p.items()} for p in space.start_with]
    return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points or None, seed=seed), max_concurrent=concurrent)


def run_trial(trial: dict[str, Any]) -> None:
    """One trial: an sft_dist run of the base config with the trial's values, reporting each validation."""
    from sft_dist.driver import commands, launch_path
    from sft_dist.worker.runtime import Job

    name = f"trial-{tune.get_context().get_trial_id()}"  # the name of its Tune folder too
    cfg = config_lib.load(trial["base"], [*as_overrides(trial["params"]), f"run_name={name}"])
    data = commands.prepare_data(cfg)
    if cfg.run_dir().exists():  # a trial Tune restarts (--resume) starts over: Tune holds no checkpoint of it,
        shutil.rmtree(cfg.run_dir())  # and Ray Train would resume its run's own checkpoints behind Tune's clock
    events, ended_as = queue.Queue(), []

    def run() -> None:  # ray.tune.report belongs to the trial's own thread: the run goes in this one
        try:
            ended_as.append(launch_path.launch(cfg, data, Job(), on_event=events.put))
        except BaseException as err:
            ended_as.append(err)

    fit = threading.Thread(target=run, daemon=True)
    fit.start()
    last = []
    while fit.is_alive() or not events.empty():
        try:
            event = events.get(timeout=1)
        except queue.Empty:
            continue
        if isinstance(event, (TrainRecord, EvalRecord)) and trial["metric"] in event.metrics:
            result = {trial["metric"]: event.metrics[trial["metric"]], "step": event.step,
                      "run_dir": str(cfg.run_dir())}
            if cfg.train.max_steps and event.step >= cfg.train.max_steps:
                last.append(result)  # the run's final validation: reported below
            else:
                tune.report(result)
    outcome = ended_as[0] if ended_as else RuntimeError("the run ended without a result")
    if isinstance(outcome, BaseException):
        raise outcome
    summary = outcome.recorder.summary(data.stats, outcome.error)
    atomic_files.write_text(outcome.run_dir / "summary.json", json.dumps(summary, indent=2))
    # Tune stops a trial (kills its actor) as soon as it reports its last rung (ASHA's max_t): the final
    # validation goes after the run has ended, so its final checkpoint, export and summary are complete
    for result in last:
        tune.report(result)
    if outcome.error:
        raise RuntimeError(outcome.error)


def ended(result: Any) -> bool:
    """Whether a trial ended: failed, or its last result is marked done (at its end, or stopped by ASHA).
    A trial cut off by an interrupted search is neither (Tune's status calls it terminated all the same)."""
    return bool(result.error or result.metrics.get("done"))


def trial_table(results: Any, metric: str, keys: list[str], full: int) -> str:
    """One row per trial: its values, its last metric, how many validations it ran, how it ended."""
    rows = [["trial", *keys, metric, "validations", "status"]]
    for result in results:
        done = result.metrics.get("training_iteration", 0)
        status = ("error" if result.error else "unfinished" if not ended(result) else
                  "done" if done >= full else "stopped early")
        params = (result.config or {}).get("params", {})  # a trial cut off before its first result has none
        values = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (params.get(k, "?") for k in keys)]
        rows.append([str(result.metrics.get("trial_id", "?")), *values,
                     f"{result.metrics.get(metric, float('nan')):.4f}", str(done), status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
