"""The one token-weighted loss, used by training and evaluation alike.

Returns sums, not means: the caller divides by the number of supervised tokens of the whole global
batch (all ranks, all micro-batches), so the loss is a mean over tokens, not a mean of per-rank means.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.errors import UserError


def token_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, supervised token count, correctly predicted tokens) of a causal LM batch."""
    # Position t predicts token t+1.
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
        label_smoothing=label_smoothing,
    )
    correct = ((logits.argmax(-1) == targets) & supervised).sum()
    return loss_sum, supervised.sum(), correct


# ---------------------------------------------------------------- the same sums without the full logits
#
# Why written here: transformers' `logits_to_keep` only drops positions (we need all supervised ones);
# Liger's fused linear cross-entropy and Cut-Cross-Entropy are Triton (GPU) only and take the head's
# weight as a tensor, which under ZeRO-3 is a partition; TRL has no chunked causal-LM loss of its own.
# So: the model's own forward up to its decoder (`logits_to_keep=1` makes the head's own call one
# position), then per chunk of supervised tokens the head *module* (so ZeRO-3's hooks gather its
# partitioned weight, tied or not, and a LoRA on the head applies) and the fp32 cross-entropy, under
# `torch.utils.checkpoint` so the backward recomputes each chunk's logits instead of keeping them.
# The sums are the same as `token_loss_sums` (cross-entropy, with label smoothing, sums over tokens).

# Config fields of architectures whose logits are not just lm_head(decoder output); auto leaves them alone.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _chunk_sums(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    loss_sum = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).sum()
    return loss_sum, correct


def chunked_token_loss_sums(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, label_smoothing: float = 0.0,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_loss_sums(head(hidden), labels)` from the decoder's hidden states, `chunk_tokens` logits rows
    at a time. Only supervised positions reach the head (ignored ones add nothing to any of the sums)."""
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    rows, row_targets = hidden[:, :-1][supervised], targets[supervised]
    loss_sum = correct = None
    # At least one (maybe empty) chunk: the head is then in the graph and gets a (zero) gradient.
    for start in range(0, max(len(rows), 1), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            sums = torch.utils.checkpoint.checkpoint(_chunk_sums, head, rows[part], row_targets[part],
                                                     label_smoothing, use_reentrant=False)
        else:
            sums = _chunk_sums(head, rows[part], row_targets[part], label_smoothing)
        loss_sum = sums[0] if loss_sum is None else loss_sum + sums[0]
        correct = sums[1] if correct is None else correct + sums[1]
    return loss_sum, supervised.sum(), correct


@dataclass
class ChunkedTokenLoss:
    """The causal LM's (summed loss, supervised tokens, correct tokens) of a batch, through the engine's
    forward but without the full logits (see above). Called as `loss(engine, inputs, labels)`."""

    decoder: torch.nn.Module
    head: torch.nn.Module
    label_smoothing: float = 0.0
    chunk_tokens: int = 1024

    def __call__(self, engine: Any, inputs: dict[str, torch.Tensor],
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = self.decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
        try:
            engine(**inputs, logits_to_keep=1)
        finally:
            hook.remove()
        return chunked_token_loss_sums(captured[-1], labels, self.head, self.label_smoothing, self.chunk_tokens)


def chunked_loss_of(module: torch.nn.Module, switch: bool | str, chunk_tokens: int,
                    label_smoothing: float = 0.0, zero3: bool = False) -> ChunkedTokenLoss | None:
    """The chunked loss of a causal LM (plain or peft-wrapped) under `train.chunked_loss`, or None.

    auto: on where it is exact (the logits are the head applied to the decoder's output, and the forward
    takes `logits_to_keep`); true: on, or a clear error where it cannot be."""
    if switch is False:
        return None
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    problem = why_not_chunked(base, zero3)
    if problem is None:
        return ChunkedTokenLoss(base.get_decoder(), base.get_output_embeddings(), label_smoothing, chunk_tokens)
    if switch is True:
        raise UserError(f"true, but {type(base).__name__} {problem}; set it to auto or false",
                        key="train.chunked_loss")
    return None


def why_not_chunked(base: torch.nn.Module, zero3: bool = False) -> str | None:
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return "has no logits_to_keep argument in its forward"
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return "has no separate decoder and output embeddings"
    # Under ZeRO-3 the backward's recompute of a frozen head (LoRA elsewhere) finds its weight still
    # partitioned (DeepSpeed 0.19 gathers it for the backward only where it has a gradient to reduce).
    if zero3 and not any(p.requires_grad for p in base.get_output_embeddings().parameters()):
        return "has a frozen LM head, which ZeRO-3 leaves partitioned in the backward's recompute"
    config = getattr(base, "config", None)
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    return f"transforms its logits ({', '.join(transforms)})" if transforms else None
