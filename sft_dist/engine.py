"""DeepSpeed: its config made from ours, parameter groups, ZeRO-3 partitioned construction and
`deepspeed.initialize`. The training loop sees only the returned engine.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import deepspeed
import torch
from transformers import get_scheduler
from transformers.integrations import HfDeepSpeedConfig

from sft_dist.config import RunConfig

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
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
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
def model_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, `from_pretrained` inside this context builds the model partitioned, so no rank
    ever holds all of it; other stages build normally."""
    global _hf_deepspeed_config
    if ds_config["zero_optimization"]["stage"] == 3:
        _hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    yield


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norm scales (1-D) are not decayed."""
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned params keep their shape here
        (decay if len(shape) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def initialize(model: torch.nn.Module, cfg: RunConfig, ds_config: dict[str, Any], total_steps: int) -> Any:
    t = cfg.train

    def scheduler(optimizer: torch.optim.Optimizer) -> Any:
        return get_scheduler(
            t.scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * total_steps), num_training_steps=total_steps
        )

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, t.weight_decay),
        config=ds_config,
        lr_scheduler=scheduler,
    )
    return engine


def init_distributed() -> None:
    """Adopt the process group that Ray Train or torchrun set up (DeepSpeed keeps its own handle)."""
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None)


def parameter_elements(module: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model): under ZeRO-3 the first is a shard."""
    local = total = 0
    for param in module.parameters():
        local += param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
        total += param.ds_numel if hasattr(param, "ds_numel") else param.numel()
    return local, total
