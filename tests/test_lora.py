"""LoRA through peft under ZeRO-2 and ZeRO-3: real Ray workers and DeepSpeed engines on the tiny model.
Exported adapters are loaded with peft on the pretrained base and must reproduce the engine's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sft_dist import checkpoints
from sft_dist.cli import main

from conftest import BASELINE_STEPS as STEPS
from conftest import REPO, TINY_CONFIG, eval_losses, eval_set_loss, read_events, train_losses, train_tiny

BASE = REPO / "configs" / "models" / "tiny-llama"
R = 8
# LoRA trains few parameters from a zero start (B = 0), so it takes a larger step than full fine-tuning.
LORA = ("peft.method=lora", f"peft.r={R}", "peft.alpha=16", "train.lr=1e-2", f"train.max_steps={STEPS}",
        "checkpoint.every_steps=5")


@pytest.fixture(scope="module")
def lora_zero2_run(ray_cluster, tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("lora2"), *LORA, "deepspeed.stage=2", "eval.generate=null")


@pytest.fixture(scope="module")
def lora_zero3_run(ray_cluster, tmp_path_factory):
    """With generation at each evaluation (peft's generate under ZeRO-3) and the adapter exported at the end."""
    return train_tiny(tmp_path_factory.mktemp("lora3"), *LORA, "deepspeed.stage=3", "checkpoint.export_at_end=true")


@pytest.fixture(scope="module")
def lora_zero0_run(tmp_path_factory):
    """Without ZeRO: every rank holds the whole adapter and its optimizer state, rank 0 alone writes them
    and export reads its file (the same files for any number of ranks: one worker, in process, with
    accumulation keeping the 2 workers' global batch)."""
    return train_tiny(tmp_path_factory.mktemp("lora0"), *LORA, "deepspeed.stage=0", "eval.generate=null",
                      "checkpoint.export_at_end=true", "train.grad_accum=2", extra_args=("--no-ray",))


@pytest.fixture(scope="module")
def failed_lora_zero3_run(ray_cluster, tmp_path_factory):
    """Rank 1 raises at step 7; Ray restarts the workers, which resume from the step-5 adapter checkpoint."""
    return train_tiny(tmp_path_factory.mktemp("lora3fail"), *LORA, "deepspeed.stage=3", "eval.generate=null",
                      "debug.fail_at_step=7", "debug.fail_rank=1", "ray.max_failures=1")


@pytest.fixture(scope="module")
def zero2_exports(lora_zero2_run, tmp_path_factory):
    """`sft-dist export` of the ZeRO-2 run: the adapter folder and, with --merge-lora, the merged model."""
    out = tmp_path_factory.mktemp("lora2-export")
    assert main(["export", str(lora_zero2_run), "--out", str(out / "adapter")]) == 0
    assert main(["export", str(lora_zero2_run), "--out", str(out / "merged"), "--merge-lora"]) == 0
    return out / "adapter", out / "merged"


def expected_adapter_elements() -> int:
    """LoRA's A (r x in) and B (out x r) for every linear layer of the tiny Llama's blocks (all-linear)."""
    c = json.loads((BASE / "config.json").read_text())
    h, i, head = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)  # q, k, v, o, gate, up, down
    return R * per_layer * c["num_hidden_layers"]


eval_loss = eval_set_loss  # by the model's own loss (a PeftModel passes `labels` on to the base's)


def adapter_on_base(adapter_dir: Path) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), adapter_dir).eval()


@pytest.mark.parametrize("run", ["lora_zero2_run", "lora_zero3_run"])
def test_lora_learns_and_trains_only_the_adapter(run, request):
    run_dir = request.getfixturevalue(run)
    losses = train_losses(run_dir)
    assert len(losses) == STEPS
    # A low-rank update of a randomly initialized tiny model learns less than full fine-tuning does.
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses
    first_eval, last_eval = eval_losses(run_dir)
    assert last_eval < 0.95 * first_eval
    setup = next(e for e in read_events(run_dir) if e.get("event") == "setup")
    # Counted by full size under ZeRO-3 too, where each rank holds only a shard of every parameter.
    assert setup["trainable_params"] == expected_adapter_elements()
    base_elements = sum(t.numel() for t in load_file(BASE / "model.safetensors").values())
    assert setup["param_elements_total"] == base_elements + expected_adapter_elements()


def test_zero2_and_zero3_lora_follow_the_same_trajectory(lora_zero2_run, lora_zero3_run):
    assert train_losses(lora_zero3_run) == pytest.approx(train_losses(lora_zero2_run), rel=1e-4)


def test_lora_without_zero_follows_zero2_and_exports_its_adapter(lora_zero0_run, lora_zero2_run):
    assert train_losses(lora_zero0_run) == pytest.approx(train_losses(lora_zero2_run), rel=1e-4)
    adapter = load_file(lora_zero0_run / "model" / "adapter_model.safetensors")
    assert sum(t.numel() for t in adapter.values()) == expected_adapter_elements()
    on_base = adapter_on_base(lora_zero0_run / "model")
    assert eval_loss(on_base, lora_zero0_run.parent) == pytest.approx(eval_losses(lora_zero0_run)[-1], rel=1e-5)


def tensor_bytes(saved: object) -> int:
    """Bytes of all tensors in a loaded checkpoint file (nested dicts and lists)."""
    if isinstance(saved, torch.Tensor):
        return saved.nbytes
    if isinstance(saved, dict):
        return sum(tensor_bytes(v) for v in saved.values())
    if isinstance(saved, (list, tuple)):
        return sum(tensor_bytes(v) for v in saved)
    return 0


@pytest.mark.parametrize("run", ["lora_zero2_run", "lora_zero3_run"])
def test_a_lora_checkpoint_holds_the_adapter_and_its_optimizer_state_not_the_base(run, request):
    folder = request.getfixturevalue(run) / checkpoints.folder_name(STEPS)
    held = sum(tensor_bytes(torch.load(p, map_location="cpu", weights_only=False))
               for p in (folder / checkpoints.TAG).glob("*.pt"))
    adapter_bytes = 4 * expected_adapter_elements()  # fp32
    # Adam's state is three fp32 copies of what it trains (master weights, two moments); ZeRO-2's module
    # file adds the weights themselves (ZeRO-3's holds empty placeholders). A full fine-tune's checkpoint
    # holds the same copies of the whole model: the LoRA one is smaller by the factor model / adapter.
    assert 3 * adapter_bytes <= held <= 4 * adapter_bytes + 1024, held  # + Adam's step counters
    # On disk, with DeepSpeed's metadata and scripts and the RNG states, it is smaller than the base alone.
    checkpoint_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert checkpoint_bytes < (BASE / "model.safetensors").stat().st_size


def test_a_failed_lora_run_resumes_from_the_adapter_checkpoint_like_the_uninterrupted_run(
        failed_lora_zero3_run, lora_zero3_run):
    assert (failed_lora_zero3_run / ".debug-failed-at-step-7").exists()
    assert [e["step"] for e in read_events(failed_lora_zero3_run) if e.get("event") == "resume"] == [5]
    assert train_losses(failed_lora_zero3_run) == pytest.approx(train_losses(lora_zero3_run), rel=1e-5)
    assert eval_losses(failed_lora_zero3_run)[-1] == pytest.approx(eval_losses(lora_zero3_run)[-1], rel=1e-5)


@pytest.mark.parametrize("run", ["lora_zero2_run", "lora_zero3_run"])
def test_the_exported_adapter_on_the_base_gives_the_loss_the_engine_evaluated(run, request, zero2_exports):
    run_dir = request.getfixturevalue(run)
    adapter_dir = zero2_exports[0] if run == "lora_zero2_run" else run_dir / "model"  # zero3: export_at_end
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= set(os.listdir(adapter_dir))
    assert not (adapter_dir / "config.json").exists()  # an adapter folder, not a model folder
    assert eval_loss(adapter_on_base(adapter_dir), run_dir.parent) == pytest.approx(eval_losses(run_dir)[-1], rel=1e-5)


def test_zero3_adapter_tensors_are_whole_and_equal_zero2s(lora_zero3_run, zero2_exports):
    """ZeRO-3 partitions every parameter; an ungathered save would hold empty or [0]-shaped tensors."""
    zero3 = load_file(lora_zero3_run / "model" / "adapter_model.safetensors")
    zero2 = load_file(zero2_exports[0] / "adapter_model.safetensors")
    assert sorted(zero3) == sorted(zero2) and len(zero3) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for name, tensor in zero3.items():
        assert tensor.shape[0 if "lora_A" in name else 1] == R, name
        assert tensor.numel() > R and tensor.abs().sum() > 0, name  # B starts at zero: trained, and saved
    assert sum(t.numel() for t in zero3.values()) == expected_adapter_elements()
    for name in zero3:
        torch.testing.assert_close(zero3[name], zero2[name], rtol=1e-3, atol=1e-6)


def test_the_merged_export_is_the_base_plus_the_adapter(lora_zero2_run, zero2_exports):
    adapter_dir, merged_dir = zero2_exports
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapter_model = adapter_on_base(adapter_dir)
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    # The base is untouched: every weight LoRA does not target is the pretrained one, bit for bit,
    # and every targeted one is the pretrained one plus scale * B @ A.
    base, weights, adapter = load_file(BASE / "model.safetensors"), load_file(merged_dir / "model.safetensors"), \
        load_file(adapter_dir / "adapter_model.safetensors")
    assert sorted(weights) == sorted(base)
    for name, tensor in base.items():
        a_name = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if a_name not in adapter:
            assert torch.equal(weights[name], tensor), name
            continue
        delta = adapter[a_name.replace("lora_A", "lora_B")] @ adapter[a_name] * (16 / R)
        torch.testing.assert_close(weights[name], tensor + delta, rtol=1e-5, atol=1e-6)


def test_qlora_on_cpu_workers_is_refused_before_ray_starts():
    # An unreachable RAY_ADDRESS: had the CLI touched Ray before validating, it would fail differently.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    result = subprocess.run([sys.executable, "-m", "sft_dist", "train", str(TINY_CONFIG), "--set", "peft.method=qlora"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "peft.method" in line and "qlora needs GPU workers (ray.use_gpu: true)" in line


def test_a_wrapped_model_with_tied_embeddings_keeps_its_frozen_base_out_of_its_state_dict():
    """A tied output head is a second name for the frozen embeddings, which `named_parameters()` hides."""
    from transformers import AutoConfig

    from sft_dist.config import PeftConfig
    from sft_dist.modeling import adapters

    config = AutoConfig.from_pretrained(BASE, tie_word_embeddings=True)
    model = adapters.wrap(AutoModelForCausalLM.from_config(config), PeftConfig(method="lora", r=R), torch.float32,
                          gradient_checkpointing=False)
    assert model.base_model.model.lm_head.weight is model.base_model.model.model.embed_tokens.weight
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(model.state_dict()) == trainable and len(trainable) == 2 * 7 * 2


# ---------------------------------------------------------------- other peft methods, by name

# In process (--no-ray): the methods are the subject, not Ray; accumulation keeps the 2 workers' global batch.
OTHER_METHOD = ("train.lr=1e-2", f"train.max_steps={STEPS}", "eval.generate=null", f"checkpoint.every_steps={STEPS}",
                "checkpoint.export_at_end=true", "train.grad_accum=2")


@pytest.fixture(scope="module")
def loha_zero2_run(tmp_path_factory):
    """LoHa: two low-rank pairs per layer, multiplied elementwise (peft reads weight shapes: not ZeRO-3)."""
    return train_tiny(tmp_path_factory.mktemp("loha2"), "peft.method=loha", f"peft.options={{r: {R}, alpha: {R}}}",
                      "deepspeed.stage=2", *OTHER_METHOD, extra_args=("--no-ray",))


@pytest.fixture(scope="module")
def ia3_zero3_run(tmp_path_factory):
    """IA3: one learned scaling vector per targeted layer, on ZeRO-3's partitioned base."""
    # A vector starting at ones moves the output little per step: it takes a larger learning rate.
    return train_tiny(tmp_path_factory.mktemp("ia3"), "peft.method=ia3", f"peft.target_modules=[{LINEARS}]",
                      "deepspeed.stage=3", *OTHER_METHOD, "train.lr=1e-1", extra_args=("--no-ray",))


LINEARS = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def ia3_elements() -> int:
    """One vector per targeted linear layer (all of them): of its output size, except down_proj, which
    peft's IA3 treats as feed-forward for Llama and scales on its input."""
    c = json.loads((BASE / "config.json").read_text())
    h, i, head = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    return (q + 2 * kv + h + 2 * i + i) * c["num_hidden_layers"]  # q, k, v, o, gate, up; down's input


@pytest.mark.parametrize("run, peft_type, elements", [
    ("loha_zero2_run", "LOHA", lambda: 2 * expected_adapter_elements()),  # w = (a1 @ b1) * (a2 @ b2)
    ("ia3_zero3_run", "IA3", ia3_elements),
])
def test_other_peft_methods_by_name_train_and_export(run, peft_type, elements, request, tmp_path):
    run_dir = request.getfixturevalue(run)
    first_eval, last_eval = eval_losses(run_dir)
    assert last_eval < 0.98 * first_eval, (first_eval, last_eval)
    setup = next(e for e in read_events(run_dir) if e.get("event") == "setup")
    assert setup["trainable_params"] == elements()
    adapter_dir = run_dir / "model"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == peft_type
    saved = load_file(adapter_dir / "adapter_model.safetensors")  # under ZeRO-3, gathered from the partitions
    assert sum(t.numel() for t in saved.values()) == elements()
    on_base = adapter_on_base(adapter_dir)
    assert eval_loss(on_base, run_dir.parent) == pytest.approx(last_eval, rel=1e-5)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, on_base(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides, key, message", [
    (["peft.method=lorra"], "peft.method", "not a method of peft"),
    (["peft.method=prefix_tuning"], "peft.method", "prompt-learning methods add virtual tokens"),
    (["peft.method=ia3", "peft.options={nonsense: 1}"], "peft.options.nonsense", "not a field of peft's IA3Config"),
    (["peft.method=ia3", "peft.r=4"], "peft", "peft.r is LoRA's"),
    (["peft.method=lora", "peft.target_modules=[q_projection]"], "peft", "Target modules {'q_projection'} not found"),
    (["peft.method=loha", "deepspeed.stage=3"], "peft", "peft's loha cannot be built on ZeRO-3's partitioned weights"),
    (["peft.method=ia3"], "peft.target_modules", "ia3 with all-linear saves an adapter peft cannot load again"),
    (["peft.method=lora", "peft.options={init_lora_weights: pissa}"], "peft.options.init_lora_weights",
     "pissa changes the frozen base weights"),
])
def test_an_adapter_peft_cannot_build_is_refused_before_ray_starts(overrides, key, message, capsys):
    code = main(["train", str(TINY_CONFIG), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{key}:" in err and message in err, err


def test_peft_still_cannot_reload_an_ia3_adapter_saved_with_all_linear(tmp_path):
    """Why sft_dist refuses ia3 with all-linear (peft#2429). When this fails, peft has fixed it: drop the refusal."""
    from peft import IA3Config, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), IA3Config(target_modules="all-linear"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="feedforward_modules` should be a subset of `target_modules"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), tmp_path)


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_dora_and_rslora_reach_peft_and_export_the_adapter_the_engine_evaluated(variant, tmp_path):
    run = train_tiny(tmp_path, "peft.method=lora", f"peft.r={R}", "peft.alpha=16", f"peft.{variant}=true",
                     "train.lr=1e-2", "train.max_steps=2", "eval.at_start=false", "eval.generate=null",
                     "checkpoint.every_steps=2", "checkpoint.export_at_end=true", extra_args=("--no-ray",))
    assert json.loads((run / "model" / "adapter_config.json").read_text())[variant] is True
    saved = load_file(run / "model" / "adapter_model.safetensors")
    magnitudes = [name for name in saved if "lora_magnitude_vector" in name]
    assert len(magnitudes) == (2 * 7 if variant == "use_dora" else 0)  # DoRA: one per targeted linear, trained too
    on_base = adapter_on_base(run / "model")
    q_proj = on_base.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(16 / R ** 0.5 if variant == "use_rslora" else 16 / R)
    assert eval_loss(on_base, tmp_path) == pytest.approx(eval_losses(run)[-1], rel=1e-5)
