"""Packed rows whose attention costs what their examples cost: SDPA once per example.

Why written here: without flash-attention, transformers isolates packed examples only through a dense
block-diagonal mask over the whole row (sdpa and eager), so attention costs L² however short the
examples are (at L=1024 a token cost 1/0.60 of its cost at L=128, examples of ~63 tokens); its varlen
paths are flash-attention kernels (GPU only), and flex attention's block mask compiles through inductor
for every new shape. So a packed micro-batch is flattened into one row, as for flash-attention
(`data.batches.collate`), and this attention function, registered with transformers'
`AttentionInterface`, runs `scaled_dot_product_attention` causally over each example (the examples
start where the position ids restart): the cost is the sum of the examples' squares, and the result is
the dense mask's.

Anything else (a padded batch with its mask, generation with a cache) goes to transformers' own sdpa
path unchanged, with the mask transformers builds for sdpa.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sft_dist.data.batches import PER_EXAMPLE_ATTENTION


def per_example_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    flattened = (attention_mask is None and position_ids is not None and query.shape[0] == 1
                 and query.shape[2] == key.shape[2] == position_ids.shape[-1])
    if not flattened or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    starts = sorted({0, *(position_ids.reshape(-1) == 0).nonzero().flatten().tolist()})
    bounds = zip(starts, [*starts[1:], query.shape[2]])
    gqa = key.shape[1] != query.shape[1]
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                            scale=scaling, is_causal=True, enable_gqa=gqa)
             for s, e in bounds if e > s]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _mask(**kwargs: Any) -> torch.Tensor | None:
    """No mask for a flattened packed row (the attention finds its examples); sdpa's mask otherwise."""
    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


AttentionInterface.register(PER_EXAMPLE_ATTENTION, per_example_attention)
AttentionMaskInterface.register(PER_EXAMPLE_ATTENTION, _mask)


def use_for_packing(model: torch.nn.Module) -> bool:
    """Switch a causal LM that runs sdpa to the per-example attention; False (left as it is) where the
    model runs another kernel (flash-attention has its own varlen path) or attends in a way a causal
    SDPA per example would not reproduce (sliding windows, soft-capped scores)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "_attn_implementation", None) != "sdpa" or not _plain_causal(text):
        return False
    model.set_attn_implementation(PER_EXAMPLE_ATTENTION)
    return True


def _plain_causal(text_config: Any) -> bool:
    if getattr(text_config, "attn_logit_softcapping", None):
        return False
    if "sliding_attention" in (getattr(text_config, "layer_types", None) or ()):
        return False
    # Mistral slides whenever a window is set; Qwen2 only with use_sliding_window.
    return not (getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True))
