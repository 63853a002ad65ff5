"""Which rows each rank trains on at each step, and how they become tensors.

The plan is global: a seeded permutation per epoch is cut into global batches of
micro_batch_size x grad_accum x world_size rows, and each rank takes its disjoint slice. A global
batch holds the same rows whatever the world size, so 1 worker and 2 workers at the same global
batch follow the same trajectory, and every rank computes the same number of micro-batches, packed or
not (ranks that disagree on the step count hang the next collective). The plan's position is one
global number (step x global batch), which stays meaningful when the world size changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sft_dist.data.chat import IGNORE_INDEX

# Global batches sorted by length together when grouping (as transformers' LengthGroupedSampler does).
GROUP_SPAN_BATCHES = 50
# sft_dist's own attention for packed rows without flash-attention (`modeling.packed_attention`).
PER_EXAMPLE_ATTENTION = "sft_per_example_sdpa"
# Attention kernels that take a flattened batch as variable-length sequences from position ids alone.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", PER_EXAMPLE_ATTENTION)


@dataclass(frozen=True)
class BatchPlan:
    num_examples: int  # rows of the saved dataset: examples, or packed rows
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    # Row lengths, given only for length-grouped batching (data.group_by_length).
    lengths: np.ndarray | None = field(default=None, compare=False, repr=False)
    _orders: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The last partial global batch is dropped: a short batch would change the gradient scale.
        return self.num_examples // self.global_batch_size

    def global_batch(self, step: int) -> np.ndarray:
        """Row indices of optimizer step `step` (0-based, counted across epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self._epoch_batches(epoch)[within]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """This rank's grad_accum micro-batches of step `step`."""
        batch = self.global_batch(step).reshape(self.grad_accum, self.world_size, self.micro_batch_size)
        return [batch[m, rank] for m in range(self.grad_accum)]

    def micro_batch_number(self, m: int, rank: int) -> int:
        """The place in its global batch of this rank's m-th micro-batch: the same rows have the same number
        at every world size (the global batch is cut into micro-batches in one order, dealt out to ranks)."""
        return m * self.world_size + rank

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, global_batch_size) row indices; a pure function of (seed, epoch), memoized."""
        if epoch not in self._orders:
            self._orders.clear()  # one epoch at a time: a plan over millions of rows stays small
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            batches = order[: self.steps_per_epoch * self.global_batch_size].reshape(self.steps_per_epoch, -1)
            if self.lengths is not None:
                batches = _grouped_by_length(batches, self.lengths, np.random.default_rng([self.seed, epoch, 1]))
            self._orders[epoch] = batches
        return self._orders[epoch]


def _grouped_by_length(batches: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows sorted by length within spans of GROUP_SPAN_BATCHES global batches, then the global batches
    shuffled: each micro-batch holds similar lengths (less padding), the order stays random."""
    flat = batches.reshape(-1)
    span = GROUP_SPAN_BATCHES * batches.shape[1]
    for start in range(0, len(flat), span):
        chunk = flat[start : start + span]
        flat[start : start + span] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    return flat.reshape(batches.shape)[rng.permutation(len(batches))]


def grouping_lengths(dataset: Any, group_by_length: bool) -> np.ndarray | None:
    """The lengths a BatchPlan groups by, or None when data.group_by_length is off."""
    return np.asarray(dataset["length"]) if group_by_length else None


def eval_batches(num_examples: int, micro_batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's disjoint share of the validation set (rank, rank + world, ...): nothing dropped,
    nothing counted twice. Every rank gets the same number of batches (the last may be empty) because
    under ZeRO-3 each forward is a collective that all ranks must join.
    """
    mine = np.arange(rank, num_examples, world_size)
    per_rank = -(-num_examples // world_size)
    num_batches = -(-per_rank // micro_batch_size)
    return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(num_batches)]


def attention_of(model: Any) -> str | None:
    """The attention kernel the model runs (transformers' resolved choice), which decides how packed
    rows are presented to it."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@dataclass(frozen=True)
class TextBatches:
    """Saved token rows as model inputs (`collate`); called like `images.ImageBatches`, whose training
    batches depend on the step and rows (augmentation), which text ignores."""

    pad_id: int
    attention: str | None = None

    def __call__(self, rows: dict[str, list], indices: Any = None, step: int | None = None) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id, self.attention)


def collate(rows: dict[str, list], pad_id: int, attention: str | None = None) -> dict[str, torch.Tensor]:
    """Rows (a dataset slice: input_ids, labels, and seq_lens when packed) as model inputs plus labels.

    - flash attention: the micro-batch flattened into one row, position ids restarting at each example:
      the kernel runs the examples as variable-length sequences (no padding, no attention across them).
    - packed rows otherwise: right-padded, position ids restarting per example, and a 4-D block-diagonal
      causal mask (position ids alone do not isolate packed examples with sdpa or eager attention).
    - plain rows: right-padded with a 2-D padding mask; padded positions are masked and unsupervised.
    """
    if attention in VARLEN_ATTENTION:
        return _flattened(rows)
    if "seq_lens" in rows:
        return _packed(rows, pad_id, boolean_mask=attention == "sdpa")
    batch = _padded(rows["input_ids"], rows["labels"], pad_id)
    if "token_type_ids" in rows:  # a classifier's text pairs (BERT): padded as the tokenizer pads, with 0
        batch["token_type_ids"] = _padded(rows["token_type_ids"], rows["token_type_ids"], 0)["input_ids"]
    return batch


def _padded(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(ids) for ids in input_ids)
    batch_ids = torch.full((len(input_ids), longest), pad_id, dtype=torch.long)
    batch_labels = torch.full((len(input_ids), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(input_ids), longest), dtype=torch.long)
    for i, (ids, labs) in enumerate(zip(input_ids, labels)):
        batch_ids[i, : len(ids)] = torch.tensor(ids)
        batch_labels[i, : len(labs)] = torch.tensor(labs)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention_mask}


def _segments(rows: dict[str, list]) -> list[list[int]]:
    return rows["seq_lens"] if "seq_lens" in rows else [[len(ids)] for ids in rows["input_ids"]]


def _positions(seq_lens: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in seq_lens]) if seq_lens else torch.zeros(0, dtype=torch.long)


def _first_tokens_unsupervised(labels: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """No example's first token is a target: it would be predicted from the previous example."""
    starts = np.cumsum([0, *seq_lens[:-1]])
    labels[torch.as_tensor(starts, dtype=torch.long)] = IGNORE_INDEX
    return labels


def _flattened(rows: dict[str, list]) -> dict[str, torch.Tensor]:
    seq_lens = [n for lens in _segments(rows) for n in lens]
    ids = torch.tensor([t for row in rows["input_ids"] for t in row], dtype=torch.long)
    labels = torch.tensor([t for row in rows["labels"] for t in row], dtype=torch.long)
    labels = _first_tokens_unsupervised(labels, seq_lens)
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": _positions(seq_lens)[None]}


def _packed(rows: dict[str, list], pad_id: int, boolean_mask: bool) -> dict[str, torch.Tensor]:
    batch = _padded(rows["input_ids"], rows["labels"], pad_id)
    size, longest = batch["input_ids"].shape
    segment = torch.full((size, longest), -1, dtype=torch.long)  # the padding tail is its own segment
    position_ids = torch.zeros((size, longest), dtype=torch.long)
    for i, seq_lens in enumerate(rows["seq_lens"]):
        segment[i, : sum(seq_lens)] = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
        position_ids[i, : sum(seq_lens)] = _positions(seq_lens)
        position_ids[i, sum(seq_lens) :] = torch.arange(longest - sum(seq_lens))
    causal = torch.ones((longest, longest), dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (batch, query, key)
    if boolean_mask:  # sdpa takes booleans (True: attend): a quarter of the memory of a float mask
        mask = allowed[:, None]
    else:  # eager adds the mask to the scores
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
        mask = mask[:, None]
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": position_ids,
            "attention_mask": mask}


def on_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A batch's tensors on `device`; labels that are a list of per-image targets (detection: a dict of
    tensors per image) are moved item by item."""
    def moved(value: Any) -> Any:
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        return value.to(device)
    return {k: moved(v) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes: everything the collator made except the labels (packed rows
    add position ids and a block-diagonal mask here without the loop knowing)."""
    return {k: v for k, v in batch.items() if k != "labels"}
