"""`sft-dist bench --quick` runs end to end on the tiny model and writes its JSON (a smoke test: the
figures are timings on a shared machine, so only their presence and sanity are checked, and the
measurements that are not timings: ZeRO's per-rank bytes, and that TRL tokenizes as sft_dist does).
The MFU arithmetic is checked on its own (no GPU here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from sft_dist.errors import UserError
from sft_dist.tools import mfu

from conftest import REPO, subprocess_env

NAMES = ["1 framework overhead", "2a vs HF, unpacked", "2b vs HF, packed", "2c packing gain", "3 packing",
         "4 preprocessing", "5 checkpoint", "6 ZeRO-1 memory", "6 ZeRO-2 memory", "6 ZeRO-3 memory",
         "6b ZeRO-0 step", "6b ZeRO-1 step", "6b ZeRO-2 step", "6b ZeRO-3 step",
         "9a packed attention", "9b packed row length", "10 speech throughput"]


def part_ratios(note: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"(parameters|gradients|optimizer states) ([\d.]+)", note)}


@pytest.mark.timeout(450)  # ~150 s measured on 2 cores
def test_bench_quick_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # Its own process: the bench starts a process group and a DeepSpeed engine in the process it runs in.
    result = subprocess.run([sys.executable, "-m", "sft_dist", "bench", "--quick", "--device", "cpu", "--out",
                             str(out)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    results = {r["name"]: r for r in payload["results"]}
    assert list(results) == NAMES
    assert all(r["value"] > 0 and r["baseline"] > 0 for r in results.values())
    settings = payload["settings"]
    assert settings["model"] == str(REPO / "configs" / "models" / "tiny-llama")
    assert (settings["baseline"], settings["device"], settings["peak_tflops"]) == ("TRL SFTTrainer", "cpu", None)
    # Same model, same batches, same optimizer settings: sft_dist's steps and the plain loop's agree.
    assert float(results["1 framework overhead"]["note"].split("gap ")[1]) < 1e-4
    # TRL's own dataset preparation yields sft_dist's token ids for every conversation.
    assert "identical input ids on 256/256 rows" in results["4 preprocessing"]["note"]
    # Read off the engines (fp32): ZeRO-1/2 keep whole parameters, ZeRO-3 halves them; gradients and
    # optimizer states (fp32 master copy and Adam's moments) are halved at every stage.
    zero = {s: part_ratios(results[f"6 ZeRO-{s} memory"]["note"]) for s in (1, 2, 3)}
    for stage, parts in zero.items():
        expected = {"parameters": 0.5 if stage == 3 else 1.0, "gradients": 0.5, "optimizer states": 0.5}
        assert parts == pytest.approx(expected, abs=0.01), stage
    assert results["6 ZeRO-3 memory"]["ratio"] == pytest.approx(0.5, abs=0.01)
    for name in NAMES:
        assert name in result.stdout
    plan_quotes_the_measured_step_times(out, {s: results[f"6b ZeRO-{s} step"]["ratio"] for s in (0, 2)})


def plan_quotes_the_measured_step_times(bench_json, ratios: dict[int, float]) -> None:
    """Where ZeRO-0 fits, `sft-dist plan` of the tiny config (2 CPU workers, ZeRO-2) quotes what this very
    bench measured, or, where bench measured no gain, leaves the advice out."""
    done = subprocess.run([sys.executable, "-m", "sft_dist", "plan", str(REPO / "configs" / "tiny-cpu.yaml"),
                           "--device-memory", "8GB", "--bench", str(bench_json)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    speed = [line for line in done.stdout.splitlines() if line.startswith("speed:")]
    lower_stage = (f"bench measured it at {ratios[0]:.2f}x against ZeRO-2's {ratios[2]:.2f}x the step time of one "
                   f"process of 2 threads ({bench_json}); deepspeed.stage: 0")
    assert any(lower_stage in line for line in speed) == (ratios[0] < ratios[2]), speed
    threads = f"bench measured 2 processes of 1 thread at {ratios[0]:.2f}x"
    assert any(threads in line for line in speed) == (ratios[0] > 1.0), speed


def test_mfu_is_six_n_tokens_over_peak():
    # 135M parameters at 10,000 tokens/s: 8.1 TFLOP/s of 989.4.
    assert mfu.mfu(135_000_000, 10_000.0, 989.4) == pytest.approx(8.1e12 / 989.4e12)
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert mfu.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # the longer name wins
    assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0  # TF32
    assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", override=280.0) == 280.0
    with pytest.raises(UserError, match="--peak-tflops"):
        mfu.peak_tflops("Some Future GPU", "bf16")


def test_a_config_of_another_task_is_refused_in_one_line(capsys):
    from sft_dist.cli import main

    assert main(["bench", "--quick", "--config", str(REPO / "configs" / "commands-tiny.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.task" in err[0] and "is audio_classification" in err[0], err
