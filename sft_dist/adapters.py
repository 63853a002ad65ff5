"""Parameter-efficient fine-tuning through the `peft` library: wrapping the built model in LoRA (and
its DoRA / rsLoRA variants, or QLoRA on a 4-bit base), the trainable-parameter report, and, for export,
the adapter folder and the merge into the base. Imports neither Ray nor DeepSpeed.

Precision (decided here, for every ZeRO stage): the adapter's forward copy has the dtype of the frozen
base's compute (`train.precision`), so DeepSpeed's flat ZeRO buffers hold one dtype; its master weights
and Adam moments are fp32, kept by DeepSpeed's mixed-precision optimizer for trainable parameters only.
That is what keeps LoRA stable in bf16: bf16 keeps about three significant digits, so an update smaller
than ~0.4% of a weight would round away, while the fp32 master accumulates it. The frozen base has no master copy and no optimizer
state at all, which is where LoRA's memory saving comes from.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from sft_dist.config import PeftConfig
from sft_dist.tasks import IMAGE_HEADS, PEFT_TASK_TYPES

ADAPTER_NAME = "default"  # peft's name for the one adapter; it appears inside parameter names


def enabled(cfg: PeftConfig) -> bool:
    return cfg.method != "none"


def lora_config(cfg: PeftConfig, task: str = "causal_lm") -> LoraConfig:
    # A text classification task type makes peft train and save the new head in full (modules_to_save);
    # peft has no image task type, so an image classifier's head is named here.
    heads = IMAGE_HEADS if task == "image_classification" else []
    return LoraConfig(
        task_type=PEFT_TASK_TYPES[task],
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=[*heads, *cfg.modules_to_save] or None,
    )


def quantized_loading(cfg: PeftConfig, compute_dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for QLoRA: an NF4 base quantized on this worker's GPU; else none."""
    if cfg.method != "qlora":
        return {}
    from transformers import BitsAndBytesConfig  # needs bitsandbytes only when asked for

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": quantization, "device_map": {"": device}}


def wrap(model: torch.nn.Module, cfg: PeftConfig, train_dtype: torch.dtype, gradient_checkpointing: bool,
         task: str = "causal_lm") -> Any:
    """The model with a fresh adapter (every rank draws the same initial values from the seeded RNG);
    the base frozen. Under ZeRO-3 the base is already partitioned and the new adapter parameters are
    whole: `deepspeed.initialize` partitions them."""
    if not enabled(cfg):
        return model
    if cfg.method == "qlora":
        # Norms in fp32 and input gradients on, as a 4-bit base needs; checkpointing is already set up.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _peft_model(model, cfg, task)
    for param in model.parameters():
        if param.requires_grad:  # see the module docstring for why the adapter follows the compute dtype
            param.data = param.data.to(train_dtype)
    _keep_frozen_out_of_state_dict(model)
    return model


def _keep_frozen_out_of_state_dict(model: torch.nn.Module) -> None:
    """Make the model's state_dict hold only what training changes (adapter, modules_to_save, buffers),
    so that a checkpoint stays the adapter's size. DeepSpeed's `exclude_frozen_parameters` alone drops
    frozen parameters by their `named_parameters()` names, which leave out tied aliases: SmolLM2's
    `lm_head.weight` (its 113 MB embedding matrix) would otherwise stay in every checkpoint."""
    frozen = [name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def drop_frozen(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name in frozen:
            state_dict.pop(prefix + name, None)

    model.register_state_dict_post_hook(drop_frozen)


def _peft_model(base: torch.nn.Module, cfg: PeftConfig, task: str = "causal_lm") -> PeftModel:
    with warnings.catch_warnings():
        # peft still asks transformers for `is_gradient_checkpointing`, deprecated in transformers 5:
        # noise the user cannot act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, lora_config(cfg, task), adapter_name=ADAPTER_NAME)


def trainable_elements(model: torch.nn.Module) -> int:
    """Trainable parameter elements; a ZeRO-3 partitioned parameter counts by its full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def adapter_model(base: torch.nn.Module, cfg: PeftConfig, trained: dict[str, torch.Tensor],
                  task: str = "causal_lm") -> PeftModel:
    """`base` wrapped as in training, with the trained adapter's values (named as in training)."""
    model = _peft_model(base, cfg, task)
    result = model.load_state_dict(trained, strict=False)
    adapter_keys = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = adapter_keys & set(result.missing_keys)
    if result.unexpected_keys or missing:
        raise ValueError(f"the checkpoint does not match this adapter: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {sorted(missing)[:5]}")
    return model


def save_adapter(model: PeftModel, out: Path, base_name_or_path: str) -> None:
    """The folder `PeftModel.from_pretrained(base, out)` loads: adapter_config.json and safetensors."""
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_name_or_path
    model.save_pretrained(out, safe_serialization=True)


def save_merged(model: PeftModel, out: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """The base with the adapter folded into its weights: a plain model folder, no peft needed to load."""
    merged = model.merge_and_unload()
    merged.to(dtype).save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
