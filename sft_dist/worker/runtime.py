"""The worker's view of the world: rank, world size, device, where its events go and where the run's
checkpoints are stored.

Two implementations of one small protocol: on Ray Train (events travel to the driver through a Ray
queue) and without Ray (single process or torchrun; events go to a function in the same process), so
the training loop runs, and is debugged and benchmarked, without Ray. The loop never imports Ray.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from sft_dist import quiet, safe_loading
from sft_dist.storage import Location


@dataclass(frozen=True)
class Job:
    """What the workers are asked to do: train (perhaps from a checkpoint), sweep the learning rate
    (a training run that stops when its loss diverges), or validate a checkpoint. Plain data, so it
    travels to Ray workers as a dict."""

    kind: Literal["train", "eval", "lr_find"] = "train"
    resume_from: str | None = None  # train: a checkpoint to start from (--resume)
    checkpoint: str | None = None  # eval: the checkpoint to validate


class RunContext(Protocol):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    storage: Location  # the run's checkpoint storage: ray.storage_path / run_name

    def emit(self, event: dict[str, Any]) -> None:
        """Send a metrics event to the driver. Called on every rank; only rank 0's is sent."""

    def report_checkpoint(self, folder: Path, name: str, metrics: dict[str, Any]) -> None:
        """Hand this rank's checkpoint files to storage as checkpoint `name` (a collective)."""

    def interruption(self) -> str | None:
        """"stop" when the driver was asked to stop (SIGTERM), "preempted" when a node of the run is
        about to be reclaimed, else None. Every rank calls it at every step; ranks may disagree (the
        loop agrees on the answer with a collective)."""


@dataclass
class RayRunContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    storage: Location
    events: Any  # ray.util.queue.Queue owned by the driver
    control: Any  # ray.util.queue.Queue: the driver puts "stop" into it on SIGTERM

    def emit(self, event: dict[str, Any]) -> None:
        if self.rank == 0:
            self.events.put(event)

    def report_checkpoint(self, folder: Path, name: str, metrics: dict[str, Any]) -> None:
        import ray.train

        # Every rank reports its own files; Ray merges them into one checkpoint folder in storage.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=name)

    def interruption(self) -> str | None:
        import ray.train

        # Ray Train's own preemption notice (e.g. a spot node being drained); a broadcast from rank 0,
        # so every rank must ask at every step.
        if ray.train.get_preemption_info() is not None:
            return "preempted"
        return "stop" if self.rank == 0 and not self.control.empty() else None


@dataclass
class LocalRunContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    storage: Location
    sink: Callable[[dict[str, Any]], None]
    stop: threading.Event  # set by the process's SIGTERM handler
    # Called on rank 0 after each checkpoint: what Ray's CheckpointConfig does (checkpoint.keep).
    retain: Callable[[], None] | None = None

    def emit(self, event: dict[str, Any]) -> None:
        if self.rank == 0:
            self.sink(event)

    def report_checkpoint(self, folder: Path, name: str, metrics: dict[str, Any]) -> None:
        # Each rank copies its own files; the manifest makes the folder count only once all are there.
        target = self.storage.join(name)
        try:
            if target.is_remote:
                target.upload(folder)
            else:
                shutil.copytree(folder, target.local_path(), dirs_exist_ok=True)
        except OSError:  # e.g. the disk is full: a torn copy is never resumed from, so free its space
            target.delete()
            raise
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0 and self.retain is not None:
            self.retain()

    def interruption(self) -> str | None:
        return "stop" if self.stop.is_set() else None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a collective: every rank must call it the same number of times)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class ImportOrderError(RuntimeError):
    """DeepSpeed chose its accelerator before configure_worker could choose it: a bug in sft_dist."""


def configure_worker(use_gpu: bool, threads: int) -> None:
    """Process settings every worker needs before torch/DeepSpeed work starts. DeepSpeed picks its
    accelerator once, on import, from DS_ACCELERATOR (set here): a process that imported it before with
    another accelerator than this one fails here, not later with a confusing device error."""
    if not use_gpu:
        # DeepSpeed otherwise probes for accelerators; on CPU workers it must use its CPU accelerator.
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed JIT-builds its ops with the first `ninja` on PATH. Ray workers inherit the raylet's PATH,
    # which may find another ninja than the driver's environment; two ninja versions each see the
    # other's build as stale and rebuild the cached ops on every start (minutes on small machines).
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    # The built ops are cached per Python environment, for the same reason: two environments sharing
    # one cache (another checkout, a clean clone for CI) would each rebuild what the other built.
    env_key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / env_key))
    quiet.worker()
    safe_loading.enforce()  # no checkpoint this process loads can run code (it imports DeepSpeed)
    check_accelerator(use_gpu)


def check_accelerator(use_gpu: bool) -> None:
    """Refuse a DeepSpeed that already picked another accelerator than the one `use_gpu` asks for."""
    chosen = getattr(sys.modules.get("deepspeed.accelerator.real_accelerator"), "ds_accelerator", None)
    if chosen is None:  # not chosen yet: DeepSpeed reads DS_ACCELERATOR when it does
        return
    name = chosen.device_name()
    if (name == "cpu") == use_gpu:
        wanted = "a GPU" if use_gpu else "cpu"
        raise ImportOrderError(f"DeepSpeed was imported before runtime.configure_worker and chose the {name} "
                               f"accelerator, but this worker runs on {wanted}: import the modules that import "
                               "deepspeed (train, engine, export) only after configure_worker")


def ray_worker_main(loop_config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker. Any failure leaves it as one line naming the rank and
    host (the driver prints it as is), instead of a traceback whose last line says little."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    try:
        _run_on_ray_worker(loop_config)
    except Exception as err:
        raise RuntimeError(f"rank {rank} on {socket.gethostname()}: {one_line(err)}") from err


def _run_on_ray_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from sft_dist.config import RunConfig
    from sft_dist.data.prepare import PreparedData

    cfg = RunConfig.model_validate(loop_config["config"])
    configure_worker(cfg.ray.use_gpu, cfg.ray.threads_per_worker)
    context = ray.train.get_context()
    ctx = RayRunContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        local_rank=context.get_local_rank(),
        device=ray.train.torch.get_device() if cfg.ray.use_gpu else torch.device("cpu"),
        storage=Location.of(loop_config["storage"]),
        events=loop_config["events"],
        control=loop_config["control"],
    )
    from sft_dist.worker import train

    train.run_job(ctx, cfg, PreparedData(**loop_config["data"]), Job(**loop_config["job"]))


def one_line(err: BaseException) -> str:
    """An exception as one line: pydantic's errors as `key: message` pairs, others as their type and
    the first line of their message (the rest is a traceback or a hint the worker's log keeps)."""
    errors = getattr(err, "errors", None)
    if type(err).__name__ == "ValidationError" and callable(errors):
        return "invalid config: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors())
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def local_context(
    use_gpu: bool, threads: int, sink: Callable[[dict[str, Any]], None], storage: Location | Path,
    stop: threading.Event, retain: Callable[[], None] | None = None,
) -> LocalRunContext:
    """A context for one process, or one of torchrun's (which sets RANK, WORLD_SIZE, MASTER_ADDR...);
    `storage`: where the run's checkpoints go."""
    configure_worker(use_gpu, threads)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_gpu else "gloo")
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    return LocalRunContext(dist.get_rank(), dist.get_world_size(), local_rank, device, Location.of(storage), sink,
                           stop, retain)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
