"""DeepSpeed: its config made from ours, parameter groups, ZeRO-3 partitioned construction and
`deepspeed.initialize`. The training loop sees only the returned engine.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

import deepspeed
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from sft_dist import quiet
from sft_dist.config import RunConfig, TrainConfig
from sft_dist.worker import partitioned_init

# transformers finds the ZeRO-3 config through a module-level weak reference (for partitioned
# `from_pretrained`, and later for `generate(synced_gpus=...)`), so it must outlive construction.
_hf_deepspeed_config: HfDeepSpeedConfig | None = None


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.ray.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.ray.use_gpu}
    if ds.stage == 3:
        # Lets export gather full 16-bit weights on save instead of leaving only shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_at(world_size),
        "train_batch_size": cfg.global_batch_size(),
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay},
        },
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 10**9,  # we log ourselves; DeepSpeed's own step prints are noise
        "wall_clock_breakdown": False,
        # logging.timing: DeepSpeed times its own collectives (synchronously: on demand only); see comm_seconds.
        "comms_logger": {"enabled": cfg.logging.timing, "prof_all": True, "verbose": False},
        # Resuming at another world size goes through a universal checkpoint (checkpoint.universal_copy).
        "checkpoint": {"load_universal": load_universal},
    }
    return _merge(config, ds.extra)


def _merge(base: dict, extra: dict) -> dict:
    """`deepspeed.extra` merged last, recursively, so users can set any raw DeepSpeed key."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@contextlib.contextmanager
def model_construction(ds_config: dict[str, Any], partitioned: bool = True) -> Iterator[None]:
    """Under ZeRO-3, `from_pretrained` inside this context builds the model partitioned, so no rank
    ever holds all of it; other stages build normally. A model whose construction cannot run on
    partitioned weights (`partitioned=False`, as its task says) is built whole on each rank under ZeRO-3
    too, and `deepspeed.initialize` partitions it."""
    global _hf_deepspeed_config
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    forget_zero3_construction()  # an earlier ZeRO-3 engine in this process (tests, --no-ray) must not partition
    if zero3 and partitioned:
        # Kept for the whole job: transformers also asks it whether to sync ranks in `generate`.
        _hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
        with partitioned_init.loaded_modules_not_reinitialised():
            yield
        return
    yield
    if zero3:
        _hf_deepspeed_config = HfDeepSpeedConfig(ds_config)


def forget_zero3_construction() -> None:
    """Clear transformers' process-wide ZeRO-3 setting, which would make later `from_pretrained` and
    `from_config` calls in this process build partitioned models."""
    global _hf_deepspeed_config
    _hf_deepspeed_config = None
    unset_hf_deepspeed_config()


LAYER = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.|\.blocks?\.(\d+)\.")  # a transformer block's index


def parameter_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (learning rate, weight decay).

    Weight decay on matrices only (biases and norm scales, 1-D, are not decayed); per-parameter learning
    rates from train.layerwise_lr_decay and train.lr_overrides. The scheduler scales every group alike.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    blocks = [_block_index(n) for n, _ in named]
    num_blocks = max((b for b in blocks if b is not None), default=-1) + 1
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for (name, param), block in zip(named, blocks):
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned params keep their shape here
        key = (_learning_rate(name, block, num_blocks, t), t.weight_decay if len(shape) >= 2 else 0.0)
        group = groups.setdefault(key, {"params": [], "lr": key[0], "weight_decay": key[1], "names": []})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def _block_index(name: str) -> int | None:
    found = LAYER.search(name)
    return int(next(g for g in found.groups() if g is not None)) if found else None


def _learning_rate(name: str, block: int | None, num_blocks: int, t: TrainConfig) -> float:
    for pattern, lr in t.lr_overrides.items():
        if re.search(pattern, name):
            return lr
    if t.layerwise_lr_decay is None:
        return t.lr
    if block is not None:
        depth = num_blocks - 1 - block
    else:  # outside the blocks: the embeddings sit below them all, the final norm and head on top
        depth = num_blocks if "embed" in name or "wte" in name or "wpe" in name else 0
    return t.lr * t.layerwise_lr_decay ** depth


def group_summary(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The effective groups, for the log: lr, weight decay, size and a few parameter names."""
    return [{"lr": g["lr"], "weight_decay": g["weight_decay"], "params": len(g["names"]),
             "examples": g["names"][:3]} for g in groups]


def initialize(model: torch.nn.Module, cfg: RunConfig, ds_config: dict[str, Any], total_steps: int,
               groups: list[dict[str, Any]]) -> Any:
    t = cfg.train
    kwargs = dict(t.scheduler_kwargs)
    if t.scheduler == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, total_steps // 10))

    def scheduler(optimizer: torch.optim.Optimizer) -> Any:
        if t.scheduler == "exponential":  # not in transformers: the LR range test's geometric sweep
            growth = kwargs["end_lr"] / t.lr
            return LambdaLR(optimizer, lambda step: growth ** (min(step, total_steps - 1) / max(1, total_steps - 1)))
        return get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup(total_steps),
                             num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[{k: v for k, v in g.items() if k != "names"} for g in groups],
        config=ds_config,
        lr_scheduler=scheduler,
    )
    return engine


def init_distributed() -> None:
    """Adopt the process group that Ray Train or torchrun set up (DeepSpeed keeps its own handle)."""
    with quiet.deepspeed_shm_comm_built():
        deepspeed.init_distributed(
            dist_backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None)


def parameter_elements(module: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model): under ZeRO-3 the first is a shard."""
    local = total = 0
    for param in module.parameters():
        local += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
        total += param.ds_numel if hasattr(param, "ds_numel") else param.numel()
    return local, total


def model_state_bytes(engine: Any) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer states, read from the engine's own tensors.

    Call it between backward and step at an accumulation boundary, when the gradients are held. Parameters:
    the module's (a ZeRO-3 shard, `ds_tensor`, when partitioned); gradients: those on the parameters and the
    partitions the ZeRO optimizer keeps (`averaged_gradients`); optimizer states: ZeRO's fp32 master
    partitions (a copy even when training in fp32) and the optimizer's moments. A tensor shared by two of
    these (a view into one buffer) counts once, where it is first seen.
    """
    optimizer = engine.optimizer
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    partitions = getattr(optimizer, "averaged_gradients", None) or {}
    grads = [p.grad for p in engine.module.parameters()] + [g for group in partitions.values() for g in group or ()]
    masters = getattr(optimizer, "single_partition_of_fp32_groups", None) \
        or getattr(optimizer, "fp32_partitioned_groups_flat", [])
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer; stage 0 does not
    moments = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    seen: set[tuple[int, int]] = set()

    def new_bytes(tensors: list[torch.Tensor | None]) -> int:
        total = 0
        for t in tensors:
            if t is not None and t.numel() and (t.data_ptr(), t.numel()) not in seen:
                seen.add((t.data_ptr(), t.numel()))
                total += t.numel() * t.element_size()
        return total

    return {"parameters": new_bytes(params), "gradients": new_bytes(grads),
            "optimizer_states": new_bytes(list(masters) + moments)}


def comm_seconds() -> float:
    """Seconds this process spent in DeepSpeed's collectives since the last call (with `comms_logger` on).

    Read from the timers DeepSpeed's comms logger keeps per operation, which are reset here: the logger's
    own records are cumulative per operation name, and its per-call lists grow for the whole run, so they
    are cleared too (we never print its summary).
    """
    from deepspeed.comm import comm

    seconds = sum(timer.elapsed(reset=True) for timer in comm.timers.get_timers().values()) / 1000
    comm.comms_logger.comms_dict.clear()
    return seconds
