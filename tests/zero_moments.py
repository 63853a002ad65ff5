"""One process of a ZeRO group (stage 1, 2 or 3) (the environment torchrun would set: RANK, WORLD_SIZE, MASTER_ADDR...)
for tests/test_elastic.py: optionally restore a checkpoint (through a universal copy when it was saved at
another world size), train `steps` steps of the tiny config, gather every parameter's Adam moments
(exp_avg, exp_avg_sq) and fp32 master weights (a collective), then save a checkpoint. Rank 0 writes the
gathered tensors (or, called in the test's own process as one, returns them), so the test can compare
what a checkpoint held with what a restore at another world size holds.

    python tests/zero_moments.py CONFIG_JSON TRAIN_DIR STORAGE RESTORE_OR_- STEPS MOMENTS_OUT
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path


def gathered_state(engine) -> dict[str, dict[str, object]]:
    """{parameter name: {exp_avg, exp_avg_sq, fp32}}, full tensors on every rank (collectives)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {name: {"exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                   "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
                   "fp32": safe_get_full_fp32_param(p).clone()}
            for name, p in engine.module.named_parameters() if p.requires_grad}


def train_and_gather(cfg, train_dir: str, storage: Path, restore: str | None, steps: int, on_restored=None) -> dict:
    """In this process's group (a new one of torchrun's environment, or one process): restore (and hand
    the restored state, gathered, to `on_restored`), train, gather (rank 0 gets the state, others {}),
    save. Collective."""
    from sft_dist.worker import runtime

    ctx = runtime.local_context(False, 1, lambda event: None, storage, threading.Event())
    import datasets
    import numpy as np
    from transformers import set_seed

    from sft_dist.data.batches import BatchPlan
    from sft_dist.modeling import model as model_lib
    from sft_dist.records import LoopState
    from sft_dist.storage import Location
    from sft_dist.worker import checkpoint, session
    from sft_dist.worker import engine as engine_lib
    from sft_dist.worker.train import train_step

    engine_lib.init_distributed()  # as session.set_up does: DeepSpeed adopts the process group
    set_seed(cfg.seed)
    try:
        engine, loop_state, _ = session.build_and_restore(ctx, cfg, 20, Location.of(restore) if restore else None)
        start = loop_state.step
        if on_restored is not None:
            on_restored(gathered_state(engine))
        train_set = datasets.load_from_disk(train_dir)
        plan = BatchPlan(len(train_set), cfg.train.micro_batch_size, cfg.grad_accum_at(ctx.world_size),
                         ctx.world_size, cfg.seed)
        batches = session.batch_maker(cfg, model_lib.load_tokenizer(cfg.model), engine.module)
        supervised = np.asarray(train_set["num_supervised"])
        for step in range(start, start + steps):
            train_step(engine, ctx, train_set, plan, step, supervised, batches)
        state = gathered_state(engine)
        checkpoint.save(engine, ctx, LoopState(step=start + steps), {"step": start + steps})
    finally:  # a process that goes on (the test's own) builds its next models unpartitioned
        engine_lib.forget_zero3_construction()
    return state if ctx.rank == 0 else {}


def main(config_json: str, train_dir: str, storage: str, restore: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from sft_dist.config import RunConfig

    cfg = RunConfig.model_validate(json.loads(Path(config_json).read_text()))
    state = train_and_gather(cfg, train_dir, Path(storage), None if restore == "-" else restore, steps)
    if dist.get_rank() == 0:
        torch.save(state, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
