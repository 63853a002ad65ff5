"""Fine-tuning technique: discriminative learning rates honoured by the optimizer under ZeRO-2 and
ZeRO-3, NEFTune noise only while training, label smoothing, schedules. Real DeepSpeed engines, in
process (--no-ray); the tiny model has 2 transformer blocks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sft_dist.config import ModelConfig
from sft_dist.modeling import model as model_lib
from sft_dist.modeling.loss import token_loss_sums

from conftest import REPO, read_events, train_tiny

TINY_MODEL = REPO / "configs" / "models" / "tiny-llama"
LR, DECAY = 3e-3, 0.5


@pytest.mark.parametrize("stage", [2, 3])
def test_layerwise_decay_sets_the_optimizer_groups_and_lower_blocks_move_less(stage, tmp_path):
    run = train_tiny(tmp_path, "train.max_steps=1", f"deepspeed.stage={stage}", "train.warmup_ratio=0",
                     "train.scheduler=constant", f"train.lr={LR}", f"train.layerwise_lr_decay={DECAY}",
                     "checkpoint.every_steps=1", "checkpoint.export_at_end=true", "eval.generate=null",
                     extra_args=("--no-ray",))
    setup = next(e for e in read_events(run) if e.get("event") == "setup")
    # embeddings: 2 blocks below the top; block 0: 1 below; block 1, final norm and head: the top
    assert sorted(setup["optimizer_lrs"]) == pytest.approx([LR * DECAY**2, LR * DECAY, LR])
    before, after = load_file(TINY_MODEL / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    moved = {i: (after[f"model.layers.{i}.mlp.up_proj.weight"] - before[f"model.layers.{i}.mlp.up_proj.weight"])
             .abs().mean().item() for i in (0, 1)}
    # Adam's first step moves each weight by about its lr: block 0 about half as far as block 1
    assert moved[0] == pytest.approx(moved[1] * DECAY, rel=0.2)


@pytest.mark.parametrize("stage", [2, 3])
def test_layerwise_decay_reaches_the_lora_adapters_of_each_block(stage, tmp_path):
    run = train_tiny(tmp_path, "train.max_steps=1", f"deepspeed.stage={stage}", "peft.method=lora",
                     "train.warmup_ratio=0", "train.scheduler=constant", f"train.lr={LR}",
                     f"train.layerwise_lr_decay={DECAY}",
                     "eval.generate=null", "eval.at_start=false", "eval.at_end=false", extra_args=("--no-ray",))
    setup = next(e for e in read_events(run) if e.get("event") == "setup")
    # only the adapters train (no embeddings, no head): block 0's one below the top, block 1's the top
    assert sorted(setup["optimizer_lrs"]) == pytest.approx([LR * DECAY, LR])
    groups = sorted(setup["param_groups"], key=lambda g: g["lr"])
    for block, group in enumerate(groups):
        assert group["lr"] == pytest.approx(LR * DECAY ** (1 - block))
        assert all("lora_" in name and f".layers.{block}." in name for name in group["examples"]), group
    assert groups[0]["params"] == groups[1]["params"] > 0  # each block's adapters, all of them


def test_lr_overrides_win_over_layerwise_decay(tmp_path):
    run = train_tiny(tmp_path, "train.max_steps=1", "train.warmup_ratio=0", "train.scheduler=constant",
                     f"train.lr={LR}", f"train.layerwise_lr_decay={DECAY}", "train.lr_overrides={lm_head: 1.0e-5}",
                     "eval.generate=null", "eval.at_start=false", "eval.at_end=false", extra_args=("--no-ray",))
    groups = next(e for e in read_events(run) if e.get("event") == "setup")["param_groups"]
    head = next(g for g in groups if g["examples"] == ["lm_head.weight"])
    assert head["lr"] == 1e-5 and head["params"] == 1


def test_neftune_adds_noise_to_the_embeddings_only_in_training_mode():
    plain = model_lib.build(ModelConfig(name_or_path=str(TINY_MODEL)), torch.float32)
    noisy = model_lib.build(ModelConfig(name_or_path=str(TINY_MODEL)), torch.float32, neftune_alpha=5.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    embed = {name: m.get_input_embeddings() for name, m in (("plain", plain), ("noisy", noisy))}
    for module in embed.values():
        module.eval()
    assert torch.equal(embed["plain"](ids), embed["noisy"](ids))
    for module in embed.values():
        module.train()
    assert not torch.equal(embed["plain"](ids), embed["noisy"](ids))


def test_label_smoothing_raises_the_training_loss_of_a_confident_model():
    logits = torch.full((1, 3, 5), -10.0)
    logits[0, :, 2] = 10.0
    labels = torch.tensor([[-100, 2, 2]])
    plain, count, _ = token_loss_sums(logits, labels)
    smoothed, _, _ = token_loss_sums(logits, labels, label_smoothing=0.1)
    assert count.item() == 2 and smoothed.item() > plain.item() + 1
    # Position t predicts token t+1: plain PyTorch on the shifted pair is the oracle.
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum",
                                                 label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-6)


def test_lr_find_suggests_a_rate_in_the_range_writes_the_plot_and_leaves_no_checkpoint(tmp_path, capsys):
    from sft_dist.cli import main

    code = main(["lr-find", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", f"output_dir={tmp_path}",
                 "--lr-min", "1e-6", "--lr-max", "10", "--steps", "40", "--no-ray"])
    assert code == 0
    (run,) = tmp_path.glob("lr-find-*")
    result = json.loads((run / "lr_find.json").read_text())
    assert 1e-6 <= result["suggested_lr"] <= 10 and 1e-6 <= result["minimum_over_10"] <= 1
    assert (run / "lr_find.png").stat().st_size > 10_000
    assert not list(tmp_path.rglob("checkpoint_step_*"))  # the sweep never reaches a checkpoint
    assert "suggested learning rate" in capsys.readouterr().out


def train_lrs(run) -> list[float]:
    return [e["lr"] for e in read_events(run) if "loss" in e]


def transformers_lrs(name: str, steps: int, warmup: int, **kwargs) -> list[float]:
    """transformers' own scheduler on a plain torch optimizer: the LR after each of `steps` steps."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                              scheduler_specific_kwargs=kwargs)
    lrs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def test_cosine_follows_transformers_step_by_step_and_validates_at_each_epoch_end(tmp_path):
    """1 worker x micro-batch 32 over 256 examples: 8 steps an epoch; 10 steps cross one epoch end."""
    run = train_tiny(tmp_path, "train.max_steps=10", "train.micro_batch_size=32", "train.scheduler=cosine",
                     "train.warmup_ratio=0", "train.warmup_steps=2", f"train.lr={LR}", "eval.at_start=false",
                     "eval.at_epoch_end=true",
                     "eval.generate=null", extra_args=("--no-ray",))
    assert train_lrs(run) == pytest.approx(transformers_lrs("cosine", 10, 2), rel=1e-6)
    evals = [e for e in read_events(run) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [8, 10]  # the epoch's end, and the end
    assert next(e["epoch"] for e in read_events(run) if e.get("step") == 8 and "loss" in e) == 1.0


def test_warmup_stable_decay_follows_transformers_step_by_step(tmp_path):
    run = train_tiny(tmp_path, "train.max_steps=8", "train.scheduler=warmup_stable_decay", "train.warmup_ratio=0",
                     "train.warmup_steps=2",
                     "train.scheduler_kwargs={num_decay_steps: 3}", f"train.lr={LR}", "eval.at_start=false",
                     "eval.at_end=false", "eval.generate=null", extra_args=("--no-ray",))
    expected = transformers_lrs("warmup_stable_decay", 8, 2, num_decay_steps=3)
    assert train_lrs(run) == pytest.approx(expected, rel=1e-6)
    assert expected[2] == expected[4] == LR and expected[-1] < LR / 10  # warmup, stable, decay: all three


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """The plain in-process run the bf16 and gradient checkpointing runs are compared with."""
    return train_tiny(tmp_path_factory.mktemp("fp32"), *PLAIN, extra_args=("--no-ray",))


PLAIN = ("train.max_steps=3", "eval.at_start=false", "eval.at_end=false", "eval.generate=null")


def test_gradient_checkpointing_changes_memory_not_the_trajectory(fp32_run, tmp_path):
    run = train_tiny(tmp_path, *PLAIN, "model.gradient_checkpointing=true", extra_args=("--no-ray",))
    events, plain = [e for e in read_events(run) if "loss" in e], [e for e in read_events(fp32_run) if "loss" in e]
    assert [e["loss"] for e in events] == pytest.approx([e["loss"] for e in plain], rel=1e-5)
    assert [e["grad_norm"] for e in events] == pytest.approx([e["grad_norm"] for e in plain], rel=1e-4)


def test_bf16_training_follows_fp32_within_bf16_precision(fp32_run, tmp_path):
    run = train_tiny(tmp_path, *PLAIN, "train.precision=bf16", "checkpoint.every_steps=3", extra_args=("--no-ray",))
    bf16, fp32 = train_lrs(run), train_lrs(fp32_run)
    assert bf16 == fp32
    losses, reference = [e["loss"] for e in read_events(run) if "loss" in e], \
        [e["loss"] for e in read_events(fp32_run) if "loss" in e]
    assert losses == pytest.approx(reference, rel=2e-2) and losses != pytest.approx(reference, rel=1e-6)
    # The engine trained a bf16 model: the checkpoint's module weights are bf16 (fp32 master copies aside).
    from sft_dist import checkpoints

    module = torch.load(next((run / checkpoints.folder_name(3) / checkpoints.TAG).glob("*model_states.pt")),
                        map_location="cpu", weights_only=False)["module"]
    assert {t.dtype for t in module.values()} == {torch.bfloat16}


def test_model_dropout_acts_in_training(fp32_run, tmp_path):
    """from_pretrained hands back a model in eval mode; training must switch dropout (and NEFTune) on."""
    run = train_tiny(tmp_path, *PLAIN, "model.dropout=0.3", extra_args=("--no-ray",))
    dropped, plain = [e["loss"] for e in read_events(run) if "loss" in e], \
        [e["loss"] for e in read_events(fp32_run) if "loss" in e]
    assert dropped[0] != pytest.approx(plain[0], rel=1e-4)  # the same weights and batch: only dropout differs
