"""Measurement 6 of `sft-dist bench`: per-rank bytes of parameters, gradients and optimizer states on
real DeepSpeed engines (CPU, gloo), at 1 and at 2 processes, for ZeRO stages 1, 2 and 3; and (6b) the
step time of each stage 0-3 at 2 processes of 1 thread over one process of 2 threads at ZeRO-0, the same
global batch (two micro-batches: one per rank, or both accumulated in the one process), which is what
`sft-dist plan` quotes when fewer shards would fit.

One process is the bench's own (it already holds a one-process group); the others are groups of their
own (`python -m sft_dist.tools.bench_zero`, with the environment torchrun would set). Every process builds
the engines in turn, runs forward, backward and step, and reads the bytes off the engine's tensors
(`engine.model_state_bytes`) or times its steps; rank 0 of the group writes all ranks' as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

STAGES = (1, 2, 3)
SPEED_STAGES = (0, 1, 2, 3)
GLOBAL_MICRO_BATCHES = 2  # per step, over the group: the same global batch at 1 and at 2 processes


def _group(mode: str, config: str | None, quick: bool, world_size: int, threads: int, out: Path,
           timeout_s: float) -> list[dict[str, Any]]:
    """Run `mode` in a group of `world_size` CPU processes of `threads` threads; each rank's result."""
    from sft_dist.worker.runtime import _free_port

    env = {**os.environ, "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           # The workers run this very sft_dist, whatever the working directory or installed copy.
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "sft_dist.tools.bench_zero", mode, config or "", "quick" if quick else "full",
            str(threads), str(out)]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world_size)]
    codes = [p.wait(timeout=timeout_s) for p in procs]
    if any(codes):
        raise RuntimeError(f"the ZeRO {mode} processes exited with {codes}")
    return json.loads(out.read_text())


def measure(config: str | None, quick: bool, world_size: int, out_dir: Path, timeout_s: float = 900
            ) -> dict[int, dict[str, int]]:
    """{stage: {part: the largest rank's bytes}} at `world_size` CPU processes."""
    per_rank = _group("memory", config, quick, world_size, 1, out_dir / f"zero-{world_size}.json", timeout_s)
    return {stage: {part: max(rank[str(stage)][part] for rank in per_rank) for part in per_rank[0][str(stage)]}
            for stage in STAGES}


def step_times(config: str | None, quick: bool, out_dir: Path, timeout_s: float = 900
               ) -> tuple[list[float], dict[int, list[float]]]:
    """Median step seconds, one per pair: one process of 2 threads at ZeRO-0, and {stage: at 2 processes of
    1 thread}; the two groups alternate, so noise hits both."""
    one, two = [], {stage: [] for stage in SPEED_STAGES}
    for pair in range(1 if quick else 3):
        one.append(_group("speed", config, quick, 1, 2, out_dir / f"speed-1-{pair}.json", timeout_s)[0]["0"])
        ranks = _group("speed", config, quick, 2, 1, out_dir / f"speed-2-{pair}.json", timeout_s)
        for stage in SPEED_STAGES:
            two[stage].append(max(rank[str(stage)] for rank in ranks))
    return one, two


def measure_here(ctx: Any, config: str | None, quick: bool, out_dir: Path) -> dict[int, dict[str, int]]:
    """{stage: {part: bytes}} on this rank of the process group `ctx` is in (a collective)."""
    import torch

    from sft_dist.tools import bench
    from sft_dist.worker import engine as engine_lib
    from sft_dist.worker import session as session_lib

    measured = {}
    for stage in STAGES:
        cfg = bench.bench_config(config, quick, out_dir, f"deepspeed.stage={stage}",
                                 f"ray.num_workers={ctx.world_size}", "ray.threads_per_worker=1")
        engine = session_lib.build_engine(ctx, cfg, steps=10)
        ids = torch.arange(32).remainder(engine.module.config.vocab_size).unsqueeze(0)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        held = engine_lib.model_state_bytes(engine)  # the gradients exist until the step
        engine.step()  # the optimizer creates its moments at its first step
        measured[stage] = {**held, "optimizer_states": engine_lib.model_state_bytes(engine)["optimizer_states"]}
        engine.destroy()
    return measured


def time_here(ctx: Any, config: str | None, quick: bool, threads: int, out_dir: Path) -> dict[int, float]:
    """{stage: median seconds of a step over the global batch} on this rank (stage 0 alone in a one-process
    group); sequences of the config's full length, two steps of warm-up."""
    import time

    import torch

    from sft_dist.tools import bench
    from sft_dist.worker import session as session_lib

    timed = {}
    for stage in SPEED_STAGES if ctx.world_size > 1 else (0,):
        accum = GLOBAL_MICRO_BATCHES // ctx.world_size
        cfg = bench.bench_config(config, quick, out_dir, f"deepspeed.stage={stage}", f"train.grad_accum={accum}",
                                 f"ray.num_workers={ctx.world_size}", f"ray.threads_per_worker={threads}")
        engine = session_lib.build_engine(ctx, cfg, steps=100)
        shape = (cfg.train.micro_batch_size, cfg.data.max_seq_len)
        ids = torch.randint(engine.module.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(2 + (5 if quick else 10)):
            started = time.perf_counter()
            for _ in range(accum):
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            times.append(time.perf_counter() - started)
        timed[stage] = sorted(times[2:])[len(times[2:]) // 2]
        engine.destroy()
    return timed


def _worker(mode: str, config: str | None, quick: bool, threads: int, out: Path) -> None:
    from sft_dist.worker import runtime

    ctx = runtime.local_context(False, threads, lambda event: None, out.parent, threading.Event())
    measured = measure_here(ctx, config, quick, out.parent) if mode == "memory" else \
        time_here(ctx, config, quick, threads, out.parent)
    gathered = runtime.all_gather(measured)
    if ctx.rank == 0:
        out.write_text(json.dumps(gathered))
    # Both ranks leave the group together: a rank whose peer exits first with the group alive can abort
    # in gloo's threads at interpreter exit ("terminate called without an active exception", seen on CI).
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2] or None, sys.argv[3] == "quick", int(sys.argv[4]), Path(sys.argv[5]))
