"""Which examples each rank trains on at each step, and how they become padded tensors.

The plan is global: a seeded permutation per epoch is cut into global batches of
micro_batch_size x grad_accum x world_size examples, and each rank takes its disjoint slice. A global
batch holds the same examples whatever the world size, so 1 worker and 2 workers at the same global
batch follow the same trajectory, and every rank computes the same number of steps (ranks that disagree
on the step count hang the next collective). The plan's position is one global number (examples
consumed), which stays meaningful when the world size changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sft_dist.data.chat import IGNORE_INDEX


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The last partial global batch is dropped: a short batch would change the gradient scale.
        return self.num_examples // self.global_batch_size

    def global_batch(self, step: int) -> np.ndarray:
        """Example indices of optimizer step `step` (0-based, counted across epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return order[within * self.global_batch_size : (within + 1) * self.global_batch_size]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """This rank's grad_accum micro-batches of step `step`."""
        batch = self.global_batch(step).reshape(self.grad_accum, self.world_size, self.micro_batch_size)
        return [batch[m, rank] for m in range(self.grad_accum)]


def eval_batches(num_examples: int, micro_batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's disjoint share of the validation set (rank, rank + world, ...): nothing dropped,
    nothing counted twice. Every rank gets the same number of batches (the last may be empty) because
    under ZeRO-3 each forward is a collective that all ranks must join.
    """
    mine = np.arange(rank, num_examples, world_size)
    per_rank = -(-num_examples // world_size)
    num_batches = -(-per_rank // micro_batch_size)
    return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(num_batches)]


def collate(input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions are masked out and unsupervised."""
    longest = max(len(ids) for ids in input_ids)
    batch_ids = torch.full((len(input_ids), longest), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(input_ids), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(input_ids), longest), dtype=torch.long)
    for i, (ids, labs) in enumerate(zip(input_ids, labels)):
        batch_ids[i, : len(ids)] = torch.tensor(ids)
        batch_labels[i, : len(labs)] = torch.tensor(labs)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention_mask}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes: everything the collator made except the labels (packed rows
    add position ids and a block-diagonal mask here without the loop knowing)."""
    return {k: v for k, v in batch.items() if k != "labels"}
