"""The one way a job is launched, for `train`, `eval`, `lr-find` and each `tune` trial: connect to Ray (or
not), make the run folder, record the workers' events, fit. The commands keep their own checks before it
and their own files after it (summary.json, eval.json, lr_find.json).
"""

from __future__ import annotations

import functools
import json
import platform
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_dist import config as config_lib
from sft_dist.atomic_files import write_text
from sft_dist.config import RunConfig
from sft_dist.driver import inputs
from sft_dist.errors import RunFailure
from sft_dist.storage import run_location

if TYPE_CHECKING:
    from sft_dist.data.prepare import PreparedData
    from sft_dist.driver.metrics import RunRecorder
    from sft_dist.driver.sinks import Sink
    from sft_dist.worker.runtime import Job


@dataclass(frozen=True)
class Outcome:
    """How a launched job ended: its run folder, what the workers recorded, and why it failed (None if
    it did not): a worker's own account first (a timed-out validation, a non-finite loss), then the
    launcher's, then a record the driver could not write (a full disk)."""

    run_dir: Path
    recorder: RunRecorder
    error: str | None

    @property
    def stopped(self) -> bool:
        """Asked to stop (SIGTERM), saved: to be continued with --resume auto."""
        return self.error is None and self.recorder.end.get("stop_reason") == "stop"


def launch(cfg: RunConfig, data: PreparedData, job: Job, *, use_ray: bool = True,
           sinks: Callable[[Path], list[Sink]] | None = None,
           on_event: Callable[[dict[str, Any]], None] | None = None, continuing: bool = False,
           describe: str | None = None) -> Outcome:
    """Run `job` on Ray Train workers (or in this process, `use_ray=False`) in the run folder of
    `cfg.run_name`; every event goes to the run's recorder (and the `sinks` it opens on the run folder),
    then to `on_event` (a Tune trial's reports)."""
    from sft_dist.driver.metrics import RunRecorder

    if use_ray:
        connect_to_ray(cfg)
    run_dir = create_run_dir(cfg, continuing=continuing)
    print(f"{describe}; run folder: {run_dir}" if describe else f"run folder: {run_dir}", flush=True)
    recorder = RunRecorder(run_dir, sinks=sinks(run_dir) if sinks else ())

    def record(event: dict[str, Any]) -> None:
        recorder.record(event)
        if on_event is not None:
            on_event(event)

    error = (fit_on_ray if use_ray else fit_in_process)(cfg, data, record, job)
    return Outcome(run_dir, recorder, recorder.worker_error() or error or recorder.write_error)


def connect_to_ray(cfg: RunConfig) -> None:
    """Join the cluster (refusing storage its nodes cannot share), or start an embedded one that ends
    with this process, before the run folder exists."""
    from sft_dist.driver import launcher  # Ray is imported only once the input is known to be good

    launcher.connect(cfg)


def create_run_dir(cfg: RunConfig, continuing: bool = False) -> Path:
    run_dir = cfg.run_dir()
    if not continuing:  # checked before the data too; again here, in case a run took the name meanwhile
        inputs.check_run_folder_free(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", config_lib.dump(cfg))
    write_text(run_dir / "environment.json", json.dumps(environment(), indent=2))
    return run_dir


def fit_on_ray(cfg: RunConfig, data: PreparedData, record: Callable[[dict[str, Any]], None], job: Job) -> str | None:
    from sft_dist.driver import launcher

    with stop_on_sigterm() as stop:  # after connecting: Ray's core worker installs a SIGTERM handler of its own
        return launcher.fit(cfg, data, record, job, stop)


def fit_in_process(cfg: RunConfig, data: PreparedData, record: Callable[[dict[str, Any]], None], job: Job
                   ) -> str | None:
    """The same loop in this one process, without Ray: for debugging, benchmarks and GPU checks. A failure
    prints its traceback (stderr) before the run reports it in one line: debugging is what this mode is for."""
    from sft_dist import checkpoints
    from sft_dist.worker import runtime

    with stop_on_sigterm() as stop:
        storage = run_location(cfg.storage_path(), cfg.run_name)
        ctx = runtime.local_context(cfg.ray.use_gpu, cfg.ray.threads_per_worker, record, storage, stop,
                                    functools.partial(checkpoints.prune, storage, cfg.checkpoint.keep))
        from sft_dist.worker import train as train_loop

        try:
            train_loop.run_job(ctx, cfg, data, job)
        except Exception as err:  # the run started: report it as a failed run (exit 1), with its cause
            if not isinstance(err, RunFailure):
                traceback.print_exc(file=sys.stderr)
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
