"""The one token-weighted loss, used by training and evaluation alike.

Returns sums, not means: the caller divides by the number of supervised tokens of the whole global
batch (all ranks, all micro-batches), so the loss is a mean over tokens, not a mean of per-rank means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sft_dist.data.chat import IGNORE_INDEX


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
