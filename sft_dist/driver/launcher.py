"""Driver side of Ray: connect to a cluster (or start an embedded one), build the `TorchTrainer`, run it,
and forward rank 0's events to the recorder while it runs. The only driver module importing `ray.train`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sft_dist import quiet, shipping, storage
from sft_dist.checkpoints import SCORE
from sft_dist.config import RunConfig
from sft_dist.data.prepare import PreparedData
from sft_dist.driver import capacity, watchdog
from sft_dist.errors import UserError
from sft_dist.worker.runtime import Job, ray_worker_main

_connected_here = False  # this module called ray.init (not a caller that had initialized Ray already)


def connect(cfg: RunConfig) -> None:
    """Join `ray.address` / RAY_ADDRESS, an already initialized Ray, or start an embedded local one (which
    a watchdog ends when this process ends)."""
    global _connected_here
    if ray.is_initialized():
        return
    _connected_here = True
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        refuse_node_local_storage(cfg)
        capacity.wait_for_min_workers(cfg, scaling_config(cfg))
        return
    per_worker = (cfg.ray.resources_per_worker or {}).get("CPU", 1)
    # Logical CPUs, not cores: workers pin their own thread counts (ray.threads_per_worker).
    num_cpus = max(os.cpu_count() or 1, int(cfg.ray.max_workers * per_worker))
    # The dashboard serves the state API that Ray Train's own monitors use; it listens on localhost only.
    # "local": always a new instance of our own; without it ray.init joins the last `ray start` cluster.
    context = ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    watchdog.watch(context.address_info["session_dir"])  # this Ray ends with this process, even on SIGKILL


def refuse_node_local_storage(cfg: RunConfig) -> None:
    """Every node's workers write their checkpoint shards to ray.storage_path, and any node may have to
    read them all back: on a multi-node cluster a plain path is each node's own disk unless it is a
    shared mount, which only the user can vouch for."""
    where = storage.Location.of(cfg.storage_path())
    if where.is_remote or cfg.ray.shared_storage:
        return
    num_nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if num_nodes > 1:
        raise UserError(
            f"the Ray cluster has {num_nodes} nodes, but checkpoints would go to {where}, a path on each "
            "node's own disk; set ray.storage_path to storage every node reaches: an object store URI "
            "(s3://bucket/runs, gs://...) or a shared filesystem mounted at the same path on every node "
            "(NFS, EFS), and for a mount also set ray.shared_storage: true", key="ray.storage_path")


def scaling_config(cfg: RunConfig) -> ray.train.ScalingConfig:
    """A fixed worker count, or (MIN, MAX): Ray Train's elastic scaling, which restarts the worker group
    at whatever size the cluster holds; each new group resumes from the newest complete checkpoint."""
    return ray.train.ScalingConfig(
        num_workers=(cfg.ray.min_workers, cfg.ray.max_workers) if cfg.ray.elastic else cfg.ray.num_workers,
        elastic_resize_monitor_interval_s=cfg.ray.resize_interval_s,
        use_gpu=cfg.ray.use_gpu,
        resources_per_worker=cfg.ray.resources_per_worker,
        placement_strategy=cfg.ray.placement_strategy,
    )


def fit(
    cfg: RunConfig, data: PreparedData, on_event: Callable[[dict[str, Any]], None], job: Job | None = None,
    stop: threading.Event | None = None,
) -> str | None:
    """Run the job (training, validation of a checkpoint, a learning-rate range test) on Ray Train workers.

    Setting `stop` asks the workers to save and stop at the end of their current step. Returns None on
    success, else the failure's message. With an object-store storage the data and model folder are
    shipped there first (sft_dist.shipping), for nodes that do not see the driver's disk.
    """
    job = job or Job()
    root = storage.Location.of(cfg.storage_path())
    data = shipping.ship(cfg, data, root)
    # Ray Train writes the checkpoints through the same filesystem (endpoint, scheme, region) as ours;
    # credentials are not part of it: each node resolves its own.
    filesystem, root_path = root.filesystem()
    events, control = Queue(actor_options=_on_this_node()), Queue(actor_options=_on_this_node())
    trainer = TorchTrainer(
        train_loop_per_worker=ray_worker_main,
        train_loop_config={"config": cfg.model_dump(mode="json"), "data": data.to_dict(), "events": events,
                           "control": control, "job": dataclasses.asdict(job), "storage": str(root.join(cfg.run_name))},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=root_path,
            storage_filesystem=filesystem if root.is_remote else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=quiet.RAY_TRAIN_LOG_LEVEL if quiet.enabled() else "INFO"),
            # Ray keeps the `keep` best-scored checkpoints and always the latest (what a restart resumes
            # from). Without validation every score is equal, and the tie goes to the most recent: the
            # last `keep` are kept.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"),
        ),
    )
    done = threading.Event()
    forwarder = threading.Thread(target=_forward, args=(events, control, on_event, stop, done), daemon=True)
    forwarder.start()
    below_minimum = capacity.BelowMinimum(cfg, trainer.scaling_config)
    if cfg.ray.elastic:
        below_minimum.start()
    try:
        trainer.fit()
        error = None
    except ray.train.TrainingFailedError as failure:
        error = _failure_message(failure)
    except ray.exceptions.RayActorError:  # the controller's end, when below_minimum aborted it
        if below_minimum.reason is None:
            raise
        error = None
    finally:
        done.set()
        below_minimum.done.set()
        forwarder.join()
        _drain(events, on_event)
        ray.kill(control.actor)
        _disconnect()
    return below_minimum.reason or error


def _on_this_node() -> dict[str, Any]:
    """Actor options that keep a queue on the driver's node: anywhere else, losing that node (which an
    elastic run survives) would take the run's events with it. Ray Train pins its controller alike."""
    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=here, soft=False)}


def _disconnect() -> None:
    """Leave the Ray this module joined or started, once the job is over. Ray prints workers' output on
    the driver a little behind, and holds back repeated lines to count them; leaving flushes both, so
    the last worker lines come before the run's own closing lines instead of after its `done:`."""
    global _connected_here
    if _connected_here:
        _connected_here = False
        ray.shutdown()


def _forward(events: Queue, control: Queue, on_event: Callable, stop: threading.Event | None,
             done: threading.Event) -> None:
    """Rank 0's events to the recorder, and a stop request (once) to the workers."""
    stop_sent = False
    while not done.is_set():
        if stop is not None and stop.is_set() and not stop_sent:
            control.put("stop")
            stop_sent = True
        try:
            on_event(events.get(timeout=0.5))
        except Empty:
            continue


def _drain(events: Queue, on_event: Callable) -> None:
    while not events.empty():
        on_event(events.get_nowait())
    ray.kill(events.actor)


def _failure_message(failure: Exception) -> str:
    """Each failed rank's own error, instead of Ray's nested wrapper text. A worker's own failure is one
    line already naming its rank and host (runtime.ray_worker_main); a worker that died outright is
    Ray's account of it (its first line); a controller failure, the last line of its traceback."""
    failures = getattr(failure, "worker_failures", None) or {None: failure}
    lines = []
    for rank, error in sorted(failures.items(), key=lambda item: -1 if item[0] is None else item[0]):
        text = [line for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        if rank is None:
            lines.append(text[-1])
        else:
            lines.append(text[0] if text[0].startswith(f"rank {rank} ") else f"rank {rank}: {text[0]}")
    return "; ".join(lines)
