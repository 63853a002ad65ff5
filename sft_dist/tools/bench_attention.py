"""Measurement 9 of `sft-dist bench`: packed attention, per example (`modeling.packed_attention`) against
transformers' sdpa with the dense block-diagonal mask over the row, at row lengths 128 and 1024.

The same examples (random token ids, 20-110 tokens, ~65 on average) are packed into rows of each length,
and forward + backward runs over the same tokens per micro-batch at both lengths (a small Llama built
from a config, 1 thread), so tokens/s changes only with what attention costs per token. The variants
alternate within each repeat, so machine noise hits both.
"""

from __future__ import annotations

import time
from typing import Any

ROW_LENGTHS = (128, 1024)
VARIANTS = ("dense", "per_example")


def sizes(quick: bool) -> dict[str, int]:
    return {"tokens": 2048, "repeats": 3} if quick else {"tokens": 8192, "repeats": 5}


def packed_rows(row_length: int, tokens: int) -> dict[str, list]:
    """Best-fit packed rows of the same seeded examples, about `tokens` tokens of them."""
    import numpy as np

    from sft_dist.data.packing import best_fit_bins

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 110, size=tokens // 20)
    out: dict[str, list] = {"input_ids": [], "labels": [], "seq_lens": []}
    for members in best_fit_bins(lengths, row_length):
        seq_lens = [int(lengths[i]) for i in members]
        ids = rng.integers(3, 500, size=sum(seq_lens)).tolist()
        out["input_ids"].append(ids)
        out["labels"].append(ids)
        out["seq_lens"].append(seq_lens)
        if sum(map(sum, out["seq_lens"])) >= tokens:
            break
    return out


def _model(variant: str) -> Any:
    import torch
    import transformers

    from sft_dist.modeling import packed_attention

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).train()
    model.set_attn_implementation("sdpa")
    if variant == "per_example":
        assert packed_attention.use_for_packing(model)
    return model


def _tokens_per_s(model: Any, rows: dict[str, list], micro_batch: int) -> float:
    from sft_dist.data.batches import attention_of, collate, model_inputs
    from sft_dist.modeling.loss import token_loss_sums

    start, tokens = time.perf_counter(), 0
    for i in range(0, len(rows["input_ids"]), micro_batch):
        part = {k: v[i : i + micro_batch] for k, v in rows.items()}
        batch = collate(part, 0, attention_of(model))
        token_loss_sums(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])[0].backward()
        tokens += sum(map(sum, part["seq_lens"]))
    return tokens / (time.perf_counter() - start)


def measure(quick: bool) -> dict[tuple[int, str], list[float]]:
    """{(row length, variant): tokens/s per repeat}, each repeat after one warm-up pass."""
    import torch

    torch.set_num_threads(1)
    size = sizes(quick)
    models = {v: _model(v) for v in VARIANTS}
    out: dict[tuple[int, str], list[float]] = {(n, v): [] for n in ROW_LENGTHS for v in VARIANTS}
    for length in ROW_LENGTHS:
        rows, micro = packed_rows(length, size["tokens"]), max(1, 2048 // length)  # 2048 tokens a micro-batch
        for variant in VARIANTS:
            _tokens_per_s(models[variant], rows, micro)  # warm-up
        for _ in range(size["repeats"]):
            for variant in VARIANTS:
                out[(length, variant)].append(_tokens_per_s(models[variant], rows, micro))
    return out
