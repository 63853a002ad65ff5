"""Packing: bins, packed rows, isolation of packed examples in the model (logits and loss equal to the
examples run one by one), flattened varlen batches, and plans that give every rank the same work."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sft_dist.data.batches import BatchPlan, collate, model_inputs
from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.data.packing import best_fit_bins
from sft_dist.data.stats import batching_stats
from sft_dist.modeling.loss import token_loss_sums

from conftest import model_loss_sum
from fixtures.data import TINY_MODEL, rows, run_prepare, write_jsonl


def test_best_fit_bins_hold_every_example_once_within_capacity():
    lengths = np.random.default_rng(0).integers(1, 100, size=500)
    bins = best_fit_bins(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(lengths[b].sum() for b in bins) <= 128
    assert len(bins) <= 1.1 * lengths.sum() / 128 + 1  # near the lower bound
    assert best_fit_bins(np.array([60, 60, 70, 68]), 128) == [[2], [3, 0], [1]]


@pytest.fixture(scope="module")
def packed_and_plain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    items = rows(30) + [{"messages": [{"role": "user", "content": "Count: " + "1 " * n},
                                      {"role": "assistant", "content": "ok " * n}]} for n in range(1, 30)]
    path = str(write_jsonl(tmp / "a.jsonl", items))
    packed = run_prepare(tmp, path, packing=True, max_seq_len=256)
    plain = run_prepare(tmp, path, max_seq_len=256)
    return datasets.load_from_disk(packed.train_dir), datasets.load_from_disk(plain.train_dir), packed.stats


def test_packed_rows_keep_every_example_and_its_supervision(packed_and_plain):
    packed, plain, stats = packed_and_plain
    assert sum(len(s) for s in packed["seq_lens"]) == len(plain) == stats["train"]["rows_kept"]
    assert sum(packed["num_supervised"]) == sum(plain["num_supervised"])
    assert sorted(n for s in packed["seq_lens"] for n in s) == sorted(plain["length"])
    for row in packed:
        assert len(row["input_ids"]) == sum(row["seq_lens"]) == row["length"] <= 256
        starts = np.cumsum([0, *row["seq_lens"][:-1]])
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
    assert stats["train"]["examples_per_row"] > 2


@pytest.fixture(scope="module")
def tiny_models():
    return {attn: AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation=attn).eval()
            for attn in ("eager", "sdpa")}


def one_by_one(model, row):
    """Logits and summed loss of each example of a packed row, run alone (the loss by the model's own)."""
    logits, loss = [], 0.0
    start = 0
    for n in row["seq_lens"]:
        ids, labels = row["input_ids"][start : start + n], row["labels"][start : start + n]
        logits.append(model(input_ids=torch.tensor([ids])).logits[0])
        loss += model_loss_sum(model, ids, labels)[0]
        start += n
    return torch.cat(logits), loss


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_and_loss_equal_the_examples_run_one_by_one(packed_and_plain, tiny_models, attn):
    packed, _, _ = packed_and_plain
    model = tiny_models[attn]
    rows_ = packed[[0, 1, len(packed) - 1]]  # rows of different fill: the batch is padded too
    batch = collate(rows_, pad_id=0, attention=attn)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        for i in range(3):
            row = {k: v[i] for k, v in rows_.items()}
            expected_logits, expected_loss = one_by_one(model, row)
            n = row["length"]
            torch.testing.assert_close(logits[i, :n], expected_logits, atol=1e-5, rtol=1e-5)
            loss = token_loss_sums(logits[i : i + 1], batch["labels"][i : i + 1])[0].item()
            assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_flattened_varlen_batch_gives_flash_attention_the_example_boundaries(packed_and_plain, tiny_models):
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    packed, _, _ = packed_and_plain
    rows_ = packed[[0, 1]]
    batch = collate(rows_, pad_id=0, attention="flash_attention_2")
    seq_lens = [n for lens in rows_["seq_lens"] for n in lens]
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape == (1, sum(seq_lens))
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_seqlens.tolist() == np.cumsum([0, *seq_lens]).tolist()
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    # The same boundaries isolate the examples in sdpa when transformers detects packing (no cache).
    with torch.no_grad():
        logits = tiny_models["sdpa"](**model_inputs(batch), use_cache=False).logits[0]
        expected = torch.cat([one_by_one(tiny_models["sdpa"], {k: v[i] for k, v in rows_.items()})[0] for i in (0, 1)])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_position_ids_alone_do_not_isolate_packed_examples_with_sdpa(packed_and_plain, tiny_models):
    """Why packed rows carry a 4-D mask (transformers 5.24): with the default cache, transformers does not
    look for packed sequences in the position ids. If this starts failing, the mask may be unnecessary."""
    packed, _, _ = packed_and_plain
    batch = collate(packed[[0]], pad_id=0, attention="sdpa")
    row = {k: v[0] for k, v in packed[[0]].items()}
    with torch.no_grad():
        logits = tiny_models["sdpa"](input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert not torch.allclose(logits[: row["length"]], one_by_one(tiny_models["sdpa"], row)[0], atol=1e-3)


@pytest.mark.parametrize("world_size, micro, accum", [(1, 4, 2), (2, 2, 2), (4, 1, 2)])
def test_length_grouped_plans_give_each_rank_equal_micro_batches_of_similar_length(world_size, micro, accum):
    lengths = np.random.default_rng(1).integers(10, 500, size=203)
    plan = BatchPlan(203, micro, accum, world_size, seed=5, lengths=lengths)
    reference = BatchPlan(203, 8, 1, 1, seed=5, lengths=lengths)
    epoch = np.concatenate([plan.global_batch(s) for s in range(plan.steps_per_epoch)])
    assert len(set(epoch)) == len(epoch) == 200
    for step in range(plan.steps_per_epoch + 3):  # into the second epoch
        assert sorted(plan.global_batch(step)) == sorted(reference.global_batch(step))
        counts = {len(plan.micro_batches(step, r)) for r in range(world_size)}
        assert counts == {accum}
    grouped = batching_stats(plan, lengths)["token_efficiency"]
    shuffled = batching_stats(BatchPlan(203, micro, accum, world_size, seed=5), lengths)["token_efficiency"]
    assert grouped > 0.9 > shuffled if micro > 1 else grouped == shuffled == 1.0  # one row: no padding


def test_token_efficiency_counts_padding_in_each_micro_batch():
    lengths = np.array([10, 5, 10, 10])
    stats = batching_stats(BatchPlan(4, 2, 1, 2, seed=0), lengths)
    padded = sum(max(lengths[m]) * len(m) for r in range(2) for m in BatchPlan(4, 2, 1, 2, seed=0).micro_batches(0, r))
    assert stats["token_efficiency"] == round(35 / padded, 4) and stats["steps_per_epoch"] == 1


def test_packed_plain_text_never_supervises_the_next_examples_first_token(tmp_path, tiny_models):
    """`data.format: text` supervises every token of an example, its first too (as a target of nothing):
    packed after another example, that first token must not become the target of the one before it."""
    items = [{"text": f"Tale {i}: " + "a b " * (i % 4 + 1)} for i in range(24)]
    path = str(write_jsonl(tmp_path / "text.jsonl", items))
    packed = datasets.load_from_disk(run_prepare(tmp_path, path, packing=True, format="text",
                                                 max_seq_len=128).train_dir)
    several = [row for row in packed if len(row["seq_lens"]) > 2][:3]
    assert several, "no packed row holds several examples"
    model = tiny_models["eager"]
    for row in several:
        starts = np.cumsum([0, *row["seq_lens"][:-1]])
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
        batch = collate({k: [row[k]] for k in row}, pad_id=0, attention="eager")
        with torch.no_grad():
            packed_loss = token_loss_sums(model(**model_inputs(batch)).logits, batch["labels"])[0].item()
        # The same examples one by one, each by the model's own loss.
        assert packed_loss == pytest.approx(one_by_one(model, row)[1], rel=1e-5)
