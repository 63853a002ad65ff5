"""The per-example attention for packed rows (`modeling.packed_attention`): the flattened batch gives
the logits, loss and gradients of the dense block-diagonal mask that transformers' sdpa path needs
(tied and untied embeddings, grouped and single key-value heads); anything else (generation with a
padded batch) is transformers' sdpa unchanged; models whose attention it would not reproduce keep sdpa."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from sft_dist.data.batches import PER_EXAMPLE_ATTENTION, collate, model_inputs
from sft_dist.modeling import packed_attention
from sft_dist.modeling.loss import token_loss_sums

from conftest import REPO, read_events, train_tiny
from fixtures.data import rows, run_prepare, write_jsonl

MODELS = REPO / "configs" / "models"


@pytest.fixture(scope="module")
def packed_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    items = rows(30) + [{"messages": [{"role": "user", "content": "Count: " + "1 " * n},
                                      {"role": "assistant", "content": "ok " * n}]} for n in range(1, 30)]
    prepared = run_prepare(tmp, str(write_jsonl(tmp / "a.jsonl", items)), packing=True, max_seq_len=256)
    packed = datasets.load_from_disk(prepared.train_dir)
    return packed[[0, 1, len(packed) - 1]]  # rows of different fill: the dense batch is padded too


def loss_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(**model_inputs(batch), use_cache=False).logits
    loss = token_loss_sums(logits, batch["labels"])[0]
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma"])
def test_per_example_attention_equals_the_dense_mask_in_logits_loss_and_gradients(packed_rows, name):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODELS / name, attn_implementation="sdpa").train()
    vocab = model.config.vocab_size  # the rows are tiny-llama's tokens
    packed_rows = {**packed_rows, "input_ids": [[t % vocab for t in row] for row in packed_rows["input_ids"]]}
    dense_logits, dense_loss, dense_grads = loss_and_grads(model, collate(packed_rows, 0, "sdpa"))
    assert packed_attention.use_for_packing(model)
    assert model.config._attn_implementation == PER_EXAMPLE_ATTENTION
    flat = collate(packed_rows, 0, PER_EXAMPLE_ATTENTION)
    assert flat["input_ids"].shape == (1, sum(packed_rows["length"]))  # no padding, no mask
    logits, loss, grads = loss_and_grads(model, flat)
    real = torch.cat([dense_logits[i, :n] for i, n in enumerate(packed_rows["length"])])
    torch.testing.assert_close(logits[0], real, rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(dense_loss.item(), rel=1e-5)
    for param, grad in grads.items():  # summed over ~600 tokens: compared as tensors, not element by element
        assert (grad - dense_grads[param]).norm() <= 1e-5 * dense_grads[param].norm(), param


def test_generation_of_a_padded_batch_is_transformers_sdpa_unchanged():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODELS / "tiny-llama", padding_side="left")
    prompts = tokenizer(["a b c d e f", "g"], return_tensors="pt", padding=True)
    sdpa = AutoModelForCausalLM.from_pretrained(MODELS / "tiny-llama", attn_implementation="sdpa").eval()
    expected = sdpa.generate(**prompts, max_new_tokens=6, do_sample=False)
    assert packed_attention.use_for_packing(sdpa)
    assert torch.equal(sdpa.generate(**prompts, max_new_tokens=6, do_sample=False), expected)


def test_models_it_would_not_reproduce_keep_their_attention():
    eager = AutoModelForCausalLM.from_pretrained(MODELS / "tiny-llama", attn_implementation="eager")
    sliding = AutoModelForCausalLM.from_pretrained(MODELS / "tiny-mistral", attn_implementation="sdpa",
                                                   sliding_window=16)
    for model, kept in ((eager, "eager"), (sliding, "sdpa")):
        assert not packed_attention.use_for_packing(model)
        assert model.config._attn_implementation == kept


@pytest.mark.timeout(600)
def test_a_packed_run_follows_the_dense_mask_run_step_by_step(tmp_path):
    """A real engine (--no-ray, ZeRO-2) trains packed rows with the per-example attention; the same run
    with eager attention (its 4-D float mask over the row) is the oracle, with generation at the end."""
    common = ("data.packing=true", "train.max_steps=4", "eval.at_start=false", "model.dropout=0.0")
    per_example = train_tiny(tmp_path, *common, extra_args=("--no-ray",), run_name="per_example")
    dense = train_tiny(tmp_path, *common, "model.attn_implementation=eager", extra_args=("--no-ray",),
                       run_name="dense")
    records = {name: read_events(run) for name, run in (("per_example", per_example), ("dense", dense))}
    setup = {name: next(e for e in events if e.get("event") == "setup") for name, events in records.items()}
    assert (setup["per_example"]["attention"], setup["dense"]["attention"]) == (PER_EXAMPLE_ATTENTION, "eager")
    for key in ("loss", "grad_norm"):
        mine, theirs = ([e[key] for e in records[n] if "loss" in e] for n in ("per_example", "dense"))
        assert len(mine) == 4 and mine == pytest.approx(theirs, rel=1e-4), key
    evals = {n: [e["eval_loss"] for e in events if "eval_loss" in e] for n, events in records.items()}
    assert evals["per_example"] == pytest.approx(evals["dense"], rel=1e-4) and evals["dense"]
