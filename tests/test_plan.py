"""`sft-dist plan`: model-state figures equal DeepSpeed's own estimators; parameters counted from a
config alone; the report and its recommendation for the shipped 8B GPU config, offline; the loss path's
bytes (full logits and chunked) against a real process's measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sft_dist.tools import plan

from conftest import REPO, TINY_CONFIG, subprocess_env

LLAMA3_8B = REPO / "configs" / "models" / "meta-llama--Meta-Llama-3-8B-Instruct"


@pytest.fixture(scope="module")
def estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.fixture(scope="module")
def llama3_8b():
    return plan.model_shape(LLAMA3_8B)


def test_counts_llama3_8b_parameters_from_its_config_alone(llama3_8b):
    assert llama3_8b.total_params == 8_030_261_248  # the published count of Meta-Llama-3-8B
    # ZeRO-3 gathers one module's parameters at a time: the largest is the 128256 x 4096 embedding.
    assert llama3_8b.largest_layer_params == 128_256 * 4096
    assert (llama3_8b.layers, llama3_8b.hidden, llama3_8b.heads, llama3_8b.vocab) == (32, 4096, 32, 128_256)


def test_counts_the_tiny_model_as_loading_it_does():
    from transformers import AutoModelForCausalLM

    folder = REPO / "configs" / "models" / "tiny-llama"
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert plan.model_shape(folder).total_params == sum(p.numel() for p in loaded.parameters())


SIZES = [(135_000_000, 28_311_552), (1_235_814_400, 262_668_288), (8_030_261_248, 525_336_576),
         (70_553_706_496, 1_050_673_152)]


@pytest.mark.parametrize("params, largest", SIZES)
@pytest.mark.parametrize("world, per_node", [(1, 1), (2, 2), (8, 8), (16, 8), (64, 8)])
def test_model_states_equal_deepspeeds_estimators(estimators, params, largest, world, per_node):
    zero2, zero3 = estimators
    nodes = world // per_node

    def device(stage, offload_optimizer=False, offload_params=False):
        setting = plan.Setting(stage, offload_optimizer, offload_params)
        return sum(plan.model_state_bytes(params, largest, setting, "bf16", world).values())

    def host(stage, offload_optimizer=False, offload_params=False):
        return plan.host_bytes_per_node(params, largest, plan.Setting(stage, offload_optimizer, offload_params),
                                        world, per_node)

    for offload in (False, True):
        cpu, gpu = zero2(params, per_node, nodes, cpu_offload=offload)
        assert (device(2, offload), host(2, offload)) == (gpu, cpu)
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = zero3(params, largest, per_node, nodes, cpu_offload=offload, cpu_offload_params=offload_params)
        assert (device(3, offload, offload_params), host(3, offload, offload_params)) == (gpu, cpu)


def test_partitioned_states_halve_from_one_to_two_workers():
    params, setting = 1_000_000_000, plan.Setting(3)
    one, two = (plan.model_state_bytes(params, 0, setting, "bf16", n) for n in (1, 2))
    assert two["params"] * 2 == one["params"] and two["optimizer"] * 2 == one["optimizer"]
    # fp32, ZeRO-0: 4 + 4 + 8 bytes per parameter, on every rank.
    assert sum(plan.model_state_bytes(params, 0, plan.Setting(0), "fp32", 8).values()) == 16 * params


def test_activations_with_checkpointing_keep_layer_inputs_only(llama3_8b):
    full = plan.activation_bytes(llama3_8b, 1, 4096, "bf16", eager_attention=False, checkpointing=False)
    kept = plan.activation_bytes(llama3_8b, 1, 4096, "bf16", eager_attention=False, checkpointing=True)
    logits = 4096 * 128_256 * 10
    assert full - logits == 32 * 34 * 4096 * 4096  # s·b·h·34 bytes per layer
    assert kept - logits == 32 * 2 * 4096 * 4096 + 34 * 4096 * 4096


def test_plan_prints_the_table_and_recommends_offline(capsys):
    from sft_dist.cli import main

    assert main(["plan", str(REPO / "configs" / "llama3-8b-gpu.yaml"), "--device-memory", "80GB"]) == 0
    text = capsys.readouterr().out
    assert "8.030 B parameters" in text and "*ZeRO-3" in text
    assert [line.split()[0] for line in text.splitlines() if line.lstrip("* ").startswith("ZeRO-")] == [
        "ZeRO-0", "ZeRO-1", "ZeRO-2", "*ZeRO-3", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3"]
    assert "recommendation: ZeRO-1 without gradient checkpointing" in text
    # Smaller devices: offload and checkpointing, the lowest stage that fits (21.4 GiB, 10.3 GiB).
    for size, expected in (("24GB", "ZeRO-2 offload optimizer"), ("16GB", "ZeRO-3 offload optimizer")):
        assert main(["plan", str(REPO / "configs" / "llama3-8b-gpu.yaml"), "--device-memory", size]) == 0
        assert f"recommendation: {expected} with gradient checkpointing" in capsys.readouterr().out


def speed_lines(capsys, *args: str) -> list[str]:
    from sft_dist.cli import main

    assert main(["plan", *args]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed:")]


def test_plan_advises_fewer_shards_where_they_fit_with_benchs_figures(capsys, tmp_path):
    gpu, cpu = str(REPO / "configs" / "llama3-8b-gpu.yaml"), str(TINY_CONFIG)
    measured = tmp_path / "bench.json"
    measured.write_text(json.dumps({"results": [{"name": "6b ZeRO-1 step", "ratio": 1.1},
                                                {"name": "6b ZeRO-3 step", "ratio": 1.9},
                                                {"name": "6b ZeRO-0 step", "ratio": 1.05},
                                                {"name": "6b ZeRO-2 step", "ratio": 1.2}]}))
    # ZeRO-3 configured, ZeRO-1 fits 80 GB: said, without figures (no bench file), then with bench's.
    plain = speed_lines(capsys, gpu, "--device-memory", "80GB")
    assert plain[0].startswith("speed: ZeRO-1 without offload fits too") and "deepspeed.stage: 1" in plain[0]
    assert "`sft-dist bench` measures these" in plain[-1] and len(plain) == 2  # a GPU config: no threads advice
    quoted = speed_lines(capsys, gpu, "--device-memory", "80GB", "--bench", str(measured))
    assert quoted == [f"speed: ZeRO-1 fits too, and bench measured it at 1.10x against ZeRO-3's 1.90x the step time "
                      f"of one process of 2 threads ({measured}); deepspeed.stage: 1"]
    # Where nothing fits but the configured setting, or bench measured no gain, nothing is advised.
    assert speed_lines(capsys, gpu, "--device-memory", "16GB", "--bench", str(measured)) == []
    # The tiny config on CPU: 2 workers at ZeRO-2, ZeRO-0 fits: a lower stage and one worker of 2 threads.
    cpu_lines = speed_lines(capsys, cpu, "--device-memory", "8GB", "--bench", str(measured))
    assert len(cpu_lines) == 2 and cpu_lines[0].endswith("deepspeed.stage: 0")
    assert cpu_lines[1].endswith("ray.num_workers: 1, ray.threads_per_worker: 2")
    assert "bench measured 2 processes of 1 thread at 1.05x" in cpu_lines[1]
    measured.write_text(json.dumps({"results": [{"name": "6b ZeRO-0 step", "ratio": 0.9},
                                                {"name": "6b ZeRO-2 step", "ratio": 0.8}]}))
    assert speed_lines(capsys, cpu, "--device-memory", "8GB", "--bench", str(measured)) == []


@pytest.mark.parametrize("content, words", [(None, "no such file"), ("[1, 2]", "not a `sft-dist bench` result")])
def test_a_bench_file_plan_cannot_read_is_refused_in_one_line(capsys, tmp_path, content, words):
    from sft_dist.cli import main

    given = tmp_path / "bench.json"
    if content is not None:
        given.write_text(content)
    assert main(["plan", str(TINY_CONFIG), "--device-memory", "8GB", "--bench", str(given)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bench" in err[0] and words in err[0], err


def test_bad_device_memory_exits_2(capsys):
    from sft_dist.cli import main

    assert main(["plan", str(TINY_CONFIG), "--device-memory", "lots"]) == 2
    assert "--device-memory" in capsys.readouterr().err


def test_sizes_an_image_classifier_by_its_own_parameters_and_patches(capsys):
    """A classifier is built by its task's class (the tiny ViT with a 3-label head), not as a causal LM."""
    from transformers import AutoModelForImageClassification

    from sft_dist.cli import main

    folder = REPO / "configs" / "models" / "tiny-vit"
    loaded = AutoModelForImageClassification.from_pretrained(folder, num_labels=3)
    shape = plan.model_shape(folder, task="image_classification", num_labels=3)
    assert shape.total_params == sum(p.numel() for p in loaded.parameters()) == 24_003
    assert (shape.vocab, shape.positions) == (3, 17)  # 3 labels; (32 / 8)^2 patches and [CLS]
    assert main(["plan", str(REPO / "configs" / "image-tiny.yaml"), "--set", "model.num_labels=3"]) == 0
    text = capsys.readouterr().out
    assert "(24,003;" in text and "labels 3" in text and "micro-batch 8 x 17 patches" in text


def test_sizes_speech_models_by_the_frames_their_encoders_make():
    """A speech model's rows are its encoder's frames, as the model itself makes them: Whisper pads every
    clip to its window and decodes up to max_target_positions tokens over its vocabulary; wav2vec2 makes a
    frame per 320 samples of the longest clip (data.max_audio_s)."""
    import numpy as np
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, AutoModelForSpeechSeq2Seq

    from sft_dist.cli import main

    models = REPO / "configs" / "models"
    whisper = AutoModelForSpeechSeq2Seq.from_pretrained(models / "tiny-whisper")
    features = AutoFeatureExtractor.from_pretrained(models / "tiny-whisper")(
        np.zeros(8000, dtype=np.float32), sampling_rate=16000, return_tensors="pt").input_features  # a 0.5 s clip
    shape = plan.model_shape(models / "tiny-whisper", task="speech_recognition")
    with torch.no_grad():
        assert whisper.model.encoder(features).last_hidden_state.shape[1] == shape.positions
    assert (shape.decoder_layers, shape.decoder_positions, shape.vocab) == (
        whisper.config.decoder_layers, whisper.config.max_target_positions, whisper.config.vocab_size)
    wav2vec2 = AutoModelForAudioClassification.from_pretrained(models / "tiny-wav2vec2", num_labels=12)
    shape = plan.model_shape(models / "tiny-wav2vec2", task="audio_classification", num_labels=12, audio_s=2.0)
    with torch.no_grad():
        frames = wav2vec2.wav2vec2(torch.zeros(1, 32000)).last_hidden_state.shape[1]
    assert abs(frames - shape.positions) <= 1 and shape.vocab == 12 and not shape.decoder_layers  # 99 and 100
    assert main(["plan", str(REPO / "configs" / "speech-tiny.yaml")]) == 0
    assert main(["plan", str(REPO / "configs" / "commands-tiny.yaml"), "--set", "data.max_audio_s=2"]) == 0


def bench_loss_peak(variant: str, parent_holds_bytes: int = 0) -> float:
    """The peak a real `python -m sft_dist.tools.bench_loss` process measures (bench's quick sizes), started
    by a process that holds `parent_holds_bytes` (as a long pytest session does: its peak is not the child's)."""
    start = ("import subprocess, sys; held = b'1' * int(sys.argv[1]); "
             "sys.exit(subprocess.run(sys.argv[2:]).returncode)")
    args = [sys.executable, "-c", start, str(parent_holds_bytes),
            sys.executable, "-m", "sft_dist.tools.bench_loss", variant, "quick", "cpu"]
    done = subprocess.run(args, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


@pytest.fixture(scope="module")
def decoder_floor() -> float:
    floor = bench_loss_peak("decoder", parent_holds_bytes=2**30)
    assert floor < 2**29, floor  # the child's own peak (about 110 MB), not its parent's gigabyte
    return floor


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", ["full", "chunked"])
def test_loss_path_estimate_is_within_10_percent_of_the_measured_peak(variant, decoder_floor, tmp_path):
    """On bench's tiny-width 128k-vocabulary Llama, plan's loss-path bytes (full logits, or one chunk's)
    against what a real process measures: its peak in forward and backward over the same steps' peak
    without the loss over the head (decoder, gradients and allocator alike)."""
    from sft_dist.config import load
    from sft_dist.tools import bench_loss

    bench_loss._model("cpu").config.save_pretrained(tmp_path)  # the very model the bench measures
    shape = plan.model_shape(tmp_path)
    assert shape.chunkable and shape.vocab == bench_loss.VOCAB
    size = bench_loss.sizes(quick=True)
    switch = "auto" if variant == "chunked" else "false"
    cfg = load(TINY_CONFIG, [f"train.chunked_loss={switch}", f"train.loss_chunk_tokens={size['chunk']}"])
    chunk = plan.loss_chunk(cfg, shape)
    assert chunk == (size["chunk"] if variant == "chunked" else None)
    estimate = plan.loss_path_bytes(shape.vocab, shape.hidden, size["seq"], "fp32", chunk)
    assert estimate == pytest.approx(bench_loss_peak(variant) - decoder_floor, rel=0.10)
