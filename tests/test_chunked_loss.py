"""The chunked causal-LM loss (train.chunked_loss) against the full logits: the same summed loss,
counts and gradients, for tied and untied models, label smoothing, packed rows and LoRA; and per-step
losses of real 2-worker runs under ZeRO-2 and ZeRO-3, chunked against not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from sft_dist.errors import UserError
from sft_dist.modeling.loss import chunked_loss_of

from conftest import eval_losses, train_losses, train_tiny

VOCAB = 97


def tiny_llama(tie: bool, bias: bool = False) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                      attention_bias=bias)
    return transformers.LlamaForCausalLM(config).float()


def batch() -> dict[str, torch.Tensor]:
    """Two rows: a prompt then an answer; and a packed row of two examples (positions restart, the
    labels carry the boundary), with padding at its end."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24))
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, :3], labels[1, 11:14], labels[1, 21:] = -100, -100, -100
    positions = torch.cat([torch.arange(24)[None], torch.cat([torch.arange(11), torch.arange(13)])[None]])
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def full_loss(model, inputs: dict[str, torch.Tensor], smoothing: float) -> tuple[torch.Tensor, int]:
    """The oracle: the model's own loss (transformers' labels= path) or, smoothed, plain PyTorch's mean
    cross-entropy over the full logits; times the supervised tokens."""
    count = int((inputs["labels"][:, 1:] != -100).sum())
    if not smoothing:
        return model(**inputs).loss * count, count
    logits = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits[:, :-1]
    mean = F.cross_entropy(logits.reshape(-1, VOCAB).float(), inputs["labels"][:, 1:].reshape(-1),
                           label_smoothing=smoothing)
    return mean * count, count


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def assert_same(model, smoothing: float, chunk: int = 5) -> None:
    inputs = batch()
    expected, count = full_loss(model, inputs, smoothing)
    expected.backward()
    expected_grads = grads(model)
    chunked = chunked_loss_of(model, "auto", chunk, smoothing)
    assert chunked is not None
    labels = inputs.pop("labels")
    loss_sum, supervised, correct = chunked(model, inputs, labels)
    loss_sum.backward()
    assert int(supervised) == count
    with torch.no_grad():
        predicted = model(**inputs).logits[:, :-1].argmax(-1)
    assert int(correct) == int(((predicted == labels[:, 1:]) & (labels[:, 1:] != -100)).sum())
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    got = grads(model)
    assert got.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert (got[name] - grad).norm() <= 1e-6 * grad.norm() + 1e-12, name


@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_matches_the_full_logits(tie, bias, smoothing):
    # 5-token chunks over 38 supervised tokens: several chunks and a ragged last one.
    assert_same(tiny_llama(tie, bias), smoothing)


def test_chunked_loss_matches_with_lora_on_the_head():
    import peft

    model = peft.get_peft_model(tiny_llama(tie=False), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False))
    assert_same(model, 0.0)


def test_chunked_loss_of_a_batch_without_supervised_tokens_is_nothing():
    model = tiny_llama(tie=True)
    inputs = batch()
    labels = torch.full_like(inputs.pop("labels"), -100)
    loss_sum, supervised, correct = chunked_loss_of(model, True, 4)(model, inputs, labels)
    loss_sum.backward()
    assert (loss_sum.item(), int(supervised), int(correct)) == (0.0, 0, 0)


def test_chunked_loss_leaves_models_with_transformed_logits_alone():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       final_logit_softcapping=30.0)
    model = transformers.Gemma2ForCausalLM(config)
    assert chunked_loss_of(model, "auto", 8) is None
    with pytest.raises(UserError, match="train.chunked_loss.*final_logit_softcapping"):
        chunked_loss_of(model, True, 8)


@pytest.mark.parametrize("stage, model", [(2, "tiny-llama"), (3, "tiny-qwen2")])
def test_chunked_loss_runs_match_under_zero(ray_cluster, tmp_path, stage, model):
    """2 workers, 3 steps: each step's loss and the validation after it, chunked (8 tokens: many chunks
    per micro-batch, so under ZeRO-3 many gathers of the partitioned head in one forward and again in
    the backward) against the full logits; untied (tiny-llama) and tied embeddings (tiny-qwen2)."""
    runs = {}
    for chunked in ("true", "false"):
        runs[chunked] = train_tiny(tmp_path, "train.max_steps=3", f"deepspeed.stage={stage}",
                                   f"model.name_or_path=configs/models/{model}", f"train.chunked_loss={chunked}",
                                   "train.loss_chunk_tokens=8", "eval.at_start=false", "eval.generate=null",
                                   run_name=f"chunked-{chunked}")
    assert len(train_losses(runs["true"])) == 3
    assert train_losses(runs["true"]) == pytest.approx(train_losses(runs["false"]), rel=1e-5)
    assert eval_losses(runs["true"]) == pytest.approx(eval_losses(runs["false"]), rel=1e-5)


def test_chunked_loss_leaves_a_frozen_head_under_zero3_alone():
    import peft

    model = peft.get_peft_model(tiny_llama(tie=False), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert chunked_loss_of(model, "auto", 8, zero3=True) is None
    assert chunked_loss_of(model, "auto", 8, zero3=False) is not None
    with pytest.raises(UserError, match="frozen LM head"):
        chunked_loss_of(model, True, 8, zero3=True)
