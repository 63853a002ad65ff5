"""Packing tokenized examples into rows of at most `data.max_seq_len` tokens, once, on the driver.

Best-fit decreasing: the longest examples are placed first, each into the fullest row that still has
room. The bins are fixed for the run, so every rank sees the same rows and the batch plan stays a plan
over rows. A packed row keeps its examples' lengths (`seq_lens`): the collator restarts position ids
at each example and keeps attention inside it.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import datasets
import numpy as np

from sft_dist.data.chat import IGNORE_INDEX

PACKED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
    "num_supervised": datasets.Value("int32"), "length": datasets.Value("int32"),
    "seq_lens": datasets.List(datasets.Value("int32")),
})


def best_fit_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices grouped into bins whose lengths sum to at most `capacity` (each length <= capacity)."""
    free: list[int] = []  # the distinct amounts of free room among open bins, sorted
    bins_with_free: dict[int, list[int]] = {}  # free room -> open bins with exactly that room
    bins: list[list[int]] = []
    for index in np.argsort(-lengths, kind="stable"):
        length = int(lengths[index])
        at = bisect.bisect_left(free, length)  # the tightest bin that still fits
        if at == len(free):
            bins.append([])
            chosen, room = len(bins) - 1, capacity
        else:
            room = free[at]
            chosen = bins_with_free[room].pop()
            if not bins_with_free[room]:
                del bins_with_free[room], free[at]
        bins[chosen].append(int(index))
        left = room - length
        if left > 0:
            if left not in bins_with_free:
                bisect.insort(free, left)
            bins_with_free.setdefault(left, []).append(chosen)
    return bins


def chunk(examples: datasets.Dataset, max_seq_len: int, work_dir: Path) -> tuple[datasets.Dataset, int]:
    """Examples longer than `max_seq_len` (plain text kept whole) cut into consecutive windows of it, each
    its own example; and how many examples were cut."""
    lengths = np.asarray(examples["length"])
    if not (lengths > max_seq_len).any():
        return examples, 0
    windows = examples.map(_windows, batched=True, fn_kwargs={"size": max_seq_len}, features=examples.features,
                           cache_file_name=str(work_dir / "chunked.arrow"))
    return windows, int((lengths > max_seq_len).sum())


def _windows(batch: dict[str, list], size: int) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in batch}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        for start in range(0, len(ids), size):
            window = labels[start : start + size]
            out["input_ids"].append(ids[start : start + size])
            out["labels"].append(window)
            out["num_supervised"].append(sum(label != IGNORE_INDEX for label in window[1:]))
            out["length"].append(len(window))
    return out


def pack(examples: datasets.Dataset, max_seq_len: int, work_dir: Path) -> datasets.Dataset:
    """Rows of packed examples (columns input_ids, labels, num_supervised, length, seq_lens)."""
    bins = best_fit_bins(np.asarray(examples["length"]), max_seq_len)
    members = datasets.Dataset.from_dict({"members": bins})
    return members.map(_pack_batch, batched=True, remove_columns=["members"], fn_kwargs={"examples": examples},
                       features=PACKED_FEATURES, cache_file_name=str(work_dir / "packed.arrow"))


def _pack_batch(batch: dict[str, list], examples: datasets.Dataset) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in PACKED_FEATURES}
    for members in batch["members"]:
        rows = examples[members]
        ids, labels = [], []
        for row_ids, row_labels in zip(rows["input_ids"], rows["labels"]):
            ids += row_ids
            # The previous example's last token must not learn to predict this example's first token.
            labels += [IGNORE_INDEX] + row_labels[1:]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["num_supervised"].append(sum(rows["num_supervised"]))
        out["length"].append(len(ids))
        out["seq_lens"].append(list(rows["length"]))
    return out
