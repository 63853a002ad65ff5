"""What an elastic run (`ray.num_workers: [MIN, MAX]`) needs of the cluster's capacity: the start waits for
MIN workers' worth of alive nodes, and a run whose cluster stays below MIN ends. Ray Train's elastic policy
starts no worker group below MIN and has no deadline for it: without these bounds a lost node would leave
the run waiting forever, silently."""

from __future__ import annotations

import threading
import time

import ray
import ray.train

from sft_dist.config import RunConfig
from sft_dist.errors import UserError

POLL_S = 2.0


def workers_the_cluster_holds(scaling: ray.train.ScalingConfig) -> int:
    """Workers of `scaling` that the alive nodes hold, counted as Ray Train's elastic policy counts them
    (per node, the fewest of each resource's total / per-worker need), so our decisions are Ray's."""
    # Ray's own per-worker default (1 CPU, or 1 GPU with use_gpu): a private property, read not copied.
    need = {r: n for r, n in scaling._resources_per_worker_not_none.items() if n > 0}
    if not need:
        return scaling.max_workers
    held = sum(min(int(node["Resources"].get(r, 0.0) // n) for r, n in need.items())
               for node in ray.nodes() if node["Alive"])
    return min(held, scaling.max_workers)


def wait_for_min_workers(cfg: RunConfig, scaling: ray.train.ScalingConfig) -> None:
    """An elastic run waits for the cluster to hold MIN workers (nodes may still be joining); after
    ray.min_workers_timeout_s it is refused."""
    if not cfg.ray.elastic:
        return
    deadline = time.monotonic() + cfg.ray.min_workers_timeout_s
    while (held := workers_the_cluster_holds(scaling)) < cfg.ray.min_workers:
        if time.monotonic() > deadline:
            raise UserError(
                f"needs at least {cfg.ray.min_workers} workers, but after {cfg.ray.min_workers_timeout_s:g} s "
                f"the cluster holds {held} (per worker: {scaling._resources_per_worker_not_none}); lower MIN, "
                "add nodes, or raise ray.min_workers_timeout_s", key="ray.num_workers")
        time.sleep(POLL_S)


class BelowMinimum(threading.Thread):
    """While an elastic run trains: once the cluster has held fewer than MIN workers for
    ray.min_workers_timeout_s on end, abort the run through its Ray Train controller (Ray's own graceful
    abort, as Ctrl-C does) and keep the reason, which `fit` reports instead of the abort's error."""

    def __init__(self, cfg: RunConfig, scaling: ray.train.ScalingConfig):
        super().__init__(daemon=True, name="sft-dist-below-minimum")
        self.cfg, self.scaling = cfg, scaling
        self.reason: str | None = None
        self.done = threading.Event()

    def run(self) -> None:
        below_since = None
        while not self.done.wait(POLL_S):
            held = workers_the_cluster_holds(self.scaling)
            if held >= self.cfg.ray.min_workers:
                below_since = None
                continue
            below_since = below_since or time.monotonic()
            if time.monotonic() - below_since >= self.cfg.ray.min_workers_timeout_s:
                self.reason = (f"ray.num_workers: the cluster held {held} worker(s), below MIN "
                               f"{self.cfg.ray.min_workers}, for {self.cfg.ray.min_workers_timeout_s:g} s; the run "
                               "stopped (its checkpoints are kept: --resume auto continues it once the cluster "
                               "holds MIN workers again)")
                abort_train_controllers()
                return


def abort_train_controllers(grace_s: float = 15.0) -> None:
    """End this job's running Ray Train controllers: Ray Train's own abort first, then, if the controller
    has not ended within `grace_s`, `ray.kill`. A controller stuck starting a worker group the cluster
    cannot hold (its retries block its event loop) never serves the abort call; killing it ends the
    workers and the placement group it owns, and the checkpoints in storage stay. The trainer keeps its
    controller's handle to itself, so the handle is found through Ray's state API by class and job
    (private: the core worker's handle lookup by actor id)."""
    from ray.util.state import list_actors

    context = ray.get_runtime_context()
    # The address of the cluster this driver joined: without it the state API refuses a machine that runs
    # two Ray instances.
    for actor in list_actors(address=context.gcs_address,
                             filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE"),
                                      ("job_id", "=", context.get_job_id())]):
        worker = ray._private.worker.global_worker
        handle = worker.core_worker.get_actor_handle(ray.ActorID.from_hex(actor.actor_id))
        try:
            ray.get(handle.abort.remote(), timeout=grace_s)
        except ray.exceptions.RayActorError:
            pass  # abort ends the controller's process: its own call does not return
        except ray.exceptions.GetTimeoutError:
            ray.kill(handle, no_restart=True)
