"""Where a run's metrics go besides `metrics.jsonl` (which RunRecorder always writes): TensorBoard,
MLflow and Weights & Biases, each only when `logging.*` asks for it.

Sinks live on the driver and are fed rank 0's events by `RunRecorder.record`; workers never import
them. Each library is imported only when its sink is opened, so a sink that is off costs nothing; one
that is asked for but not installed is a config error before anything starts (`check_installed`).

Names: MLflow gets the metrics.jsonl keys as they are (`loss`, `lr`, `eval_loss`); TensorBoard and W&B
get them in sections, `train/loss`, `train/lr`, `eval/loss` (the `eval_` prefix becomes the section).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from sft_dist.config import LoggingConfig, RunConfig
from sft_dist.errors import UserError

# logging key -> (module that must be importable, the pip extra that installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
                "wandb": ("wandb", "wandb")}
# Bookkeeping fields of a record, not metrics.
NOT_METRICS = {"step", "total_steps", "event"}


class Sink(Protocol):
    def write(self, event: dict[str, Any]) -> None:
        """One metrics.jsonl record (setup, training, validation, end...)."""

    def close(self, run_dir: Path, status: str) -> None:
        """The run is over (`completed`, `stopped`, `failed`): flush, attach the run's files."""


def requested(cfg: LoggingConfig) -> list[str]:
    return [key for key in REQUIREMENTS if getattr(cfg, key)]


def check_installed(cfg: LoggingConfig) -> None:
    """A requested sink whose library is missing: a config error naming the key and the extra."""
    for key in requested(cfg):
        module, extra = REQUIREMENTS[key]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"needs the {module} package, which is not installed: pip install 'sft_dist[{extra}]'",
                            key=f"logging.{key}")


def open_sinks(cfg: RunConfig, run_dir: Path) -> list[Sink]:
    """The sinks `cfg.logging` asks for, opened (an MLflow run started, a W&B run initialized)."""
    opened: list[Sink] = []
    if cfg.logging.tensorboard:
        opened.append(TensorBoardSink(run_dir / "tensorboard"))
    if cfg.logging.mlflow:
        opened.append(MlflowSink(cfg.logging.mlflow, cfg))
    if cfg.logging.wandb:
        opened.append(WandbSink(cfg.logging.wandb, cfg, run_dir))
    return opened


def scalars(event: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """("train" | "eval", its numeric metrics) for a training or validation record; None for other events."""
    if event.get("event"):
        return None
    values = {k: float(v) for k, v in event.items()
              if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(float(v))}
    if any(k.startswith("eval_") for k in values):
        return "eval", values
    return ("train", values) if "loss" in values else None


def sectioned(kind: str, values: dict[str, float]) -> dict[str, float]:
    """`train/loss`, `eval/loss`: TensorBoard and W&B group a section's charts together."""
    return {f"{kind}/{k.removeprefix('eval_')}": v for k, v in values.items()}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as dotted keys (`train.lr`), values as text: what MLflow and W&B show as params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(log_dir))

    def write(self, event: dict[str, Any]) -> None:
        found = scalars(event)
        if found:
            for tag, value in sectioned(*found).items():
                self.writer.add_scalar(tag, value, event["step"])

    def close(self, run_dir: Path, status: str) -> None:
        self.writer.close()


def mlflow_uri(target: str) -> str:
    """A tracking URI as given (`http://...`, `sqlite:///...`, `file:///...`), or a local folder as a
    file store. MLflow 3 refuses file stores unless asked: a local folder is the user asking."""
    if "://" in target or target.startswith("databricks"):
        return target
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(target).expanduser().resolve().as_uri()


class MlflowSink:
    """One MLflow run per sft_dist run, in the experiment `sft_dist`: run name = run_name, params = the
    resolved config as dotted keys, metrics by step, and summary.json, config.yaml, loss.png at the end."""

    def __init__(self, target: str, cfg: RunConfig):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_uri(target))
        experiment_name = "sft_dist"
        found = self.client.get_experiment_by_name(experiment_name)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=cfg.run_name).info.run_id
        self._log_params(flat_params(cfg.model_dump(mode="json")))

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def write(self, event: dict[str, Any]) -> None:
        found = scalars(event)
        if found:
            from mlflow.entities import Metric

            now_ms = int(time.time() * 1000)
            metrics = [Metric(k, v, now_ms, event["step"]) for k, v in found[1].items()]
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, run_dir: Path, status: str) -> None:
        for name in ("summary.json", "config.yaml", "loss.png"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.set_terminated(self.run_id, status={"completed": "FINISHED", "stopped": "KILLED"}.get(
            status, "FAILED"))


class WandbSink:
    """A W&B run (project = `logging.wandb`); WANDB_MODE=offline and the usual W&B variables apply."""

    def __init__(self, project: str, cfg: RunConfig, run_dir: Path):
        import wandb

        self.run = wandb.init(project=project, name=cfg.run_name, dir=str(run_dir),
                              config=cfg.model_dump(mode="json"))

    def write(self, event: dict[str, Any]) -> None:
        found = scalars(event)
        if found:
            self.run.log(sectioned(*found), step=event["step"])

    def close(self, run_dir: Path, status: str) -> None:
        self.run.finish(exit_code=0 if status != "failed" else 1)
