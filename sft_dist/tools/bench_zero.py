"""Measurement 6 of `sft-dist bench`: per-rank bytes of parameters, gradients and optimizer states on
real DeepSpeed engines (CPU, gloo), at 1 and at 2 processes, for ZeRO stages 1, 2 and 3.

One process is the bench's own (it already holds a one-process group); two are a group of their own
(`python -m sft_dist.tools.bench_zero`, with the environment torchrun would set). Every process builds the
three engines in turn, runs one forward, backward and step, and reads the bytes off the engine's
tensors (`engine.model_state_bytes`); rank 0 of the pair writes both ranks' as JSON.
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


def measure(config: str | None, quick: bool, world_size: int, out_dir: Path, timeout_s: float = 900
            ) -> dict[int, dict[str, int]]:
    """{stage: {part: the largest rank's bytes}} at `world_size` CPU processes."""
    from sft_dist.worker.runtime import _free_port

    out = out_dir / f"zero-{world_size}.json"
    env = {**os.environ, "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           # The workers run this very sft_dist, whatever the working directory or installed copy.
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "sft_dist.tools.bench_zero", config or "", "quick" if quick else "full", str(out)]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world_size)]
    codes = [p.wait(timeout=timeout_s) for p in procs]
    if any(codes):
        raise RuntimeError(f"the ZeRO memory processes exited with {codes}")
    per_rank = json.loads(out.read_text())
    return {stage: {part: max(rank[str(stage)][part] for rank in per_rank) for part in per_rank[0][str(stage)]}
            for stage in STAGES}


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


def _worker(config: str | None, quick: bool, out: Path) -> None:
    from sft_dist.worker import runtime

    ctx = runtime.local_context(False, 1, lambda event: None, out.parent, threading.Event())
    gathered = runtime.all_gather(measure_here(ctx, config, quick, out.parent))
    if ctx.rank == 0:
        out.write_text(json.dumps(gathered))
    # Both ranks leave the group together: a rank whose peer exits first with the group alive can abort
    # in gloo's threads at interpreter exit ("terminate called without an active exception", seen on CI).
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1] or None, sys.argv[2] == "quick", Path(sys.argv[3]))
