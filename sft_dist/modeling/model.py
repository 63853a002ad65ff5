"""Pretrained model and tokenizer loading: a local Hugging Face folder, a hub name, or a GGUF file.

Construction happens inside a context the engine hands in (for ZeRO-3, partitioned construction) without
this module knowing what it is. Imports neither Ray nor DeepSpeed.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.integrations.neftune import neftune_post_forward_hook
from transformers.utils import is_torchvision_available

from sft_dist.config import ModelConfig
from sft_dist.errors import UserError
from sft_dist.tasks import task_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(cfg: ModelConfig) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.name_or_path, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        # Padded positions are masked and unsupervised, so any id will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_image_processor(cfg: ModelConfig) -> Any:
    """The model folder's own image processor (preprocessor_config.json). Its PIL implementation when
    torchvision, which the default one needs, is not installed: what `pipeline(...)` falls back to as
    well, so training, validation and the exported model's pipeline see the same pixels."""
    backend = {} if is_torchvision_available() else {"backend": "pil"}
    return AutoImageProcessor.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, **backend)


def load_processor(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """A model's AutoProcessor: a vision-language model's tokenizer, image processor and chat template, or a
    speech recogniser's feature extractor and tokenizer; the PIL image processor where torchvision is
    missing (as `load_image_processor`)."""
    backend = {} if is_torchvision_available() else {"backend": "pil"}
    return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **backend)


# Where transformers' vision-language models keep their vision tower (LLaVA and most: vision_tower;
# Qwen2-VL: visual; Idefics, SmolVLM: vision_model).
VISION_TOWERS = ("vision_tower", "visual", "vision_model")


def freeze_vision(model: torch.nn.Module) -> None:
    """Stop training the model's vision tower (`model.freeze_vision`)."""
    towers = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in VISION_TOWERS]
    if not towers:
        raise UserError(f"{type(model).__name__} has no vision tower ({', '.join(VISION_TOWERS)})",
                        key="model.freeze_vision")
    towers[0].requires_grad_(False)


def load_feature_extractor(cfg: ModelConfig) -> Any:
    """The model folder's own audio feature extractor (its rate, window and normalisation)."""
    return AutoFeatureExtractor.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)


def weight_dtype(cfg: ModelConfig, precision: str) -> torch.dtype:
    return PRECISION_DTYPES[precision] if cfg.dtype == "auto" else DTYPES[cfg.dtype]


def build(
    cfg: ModelConfig, dtype: torch.dtype, construction: ContextManager | None = None,
    load_kwargs: dict[str, Any] | None = None, neftune_alpha: float | None = None,
) -> torch.nn.Module:
    """The pretrained model with the task's head (a new head is initialised, the same on every seeded rank),
    built inside `construction` (e.g. ZeRO-3 partitioned init); `load_kwargs` are further `from_pretrained`
    arguments (e.g. QLoRA's quantization)."""
    config = AutoConfig.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file,
                                        trust_remote_code=cfg.trust_remote_code, **task_of(cfg).head_config(cfg))
    if cfg.dropout is not None:
        for name, value in vars(config).items():
            if "dropout" in name and isinstance(value, float):
                setattr(config, name, cfg.dropout)
    with construction or contextlib.nullcontext():
        model = task_of(cfg).auto_model().from_pretrained(
            cfg.name_or_path,
            config=config,
            gguf_file=cfg.gguf_file,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            **(load_kwargs or {}),
        )
    if cfg.freeze_vision:
        freeze_vision(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and ZeRO-3 parameter hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if neftune_alpha is not None:
        # transformers' own NEFTune hook: uniform noise on the input embeddings, only in training mode.
        embeddings = model.get_input_embeddings()
        embeddings.neftune_noise_alpha = neftune_alpha
        embeddings.register_forward_hook(neftune_post_forward_hook)
    return model


def skeleton(cfg: ModelConfig) -> torch.nn.Module:
    """The model's modules without weights (on the meta device): for checks of its structure that should
    not cost a load, such as where adapters can go."""
    config = AutoConfig.from_pretrained(cfg.name_or_path, gguf_file=cfg.gguf_file,
                                        trust_remote_code=cfg.trust_remote_code, **task_of(cfg).head_config(cfg))
    with torch.device("meta"):
        return task_of(cfg).auto_model().from_config(config, trust_remote_code=cfg.trust_remote_code)
