"""Config validation: one message naming the key (and file line), exit code 2, before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sft_dist import config as config_lib
from sft_dist.errors import UserError

from conftest import REPO, TINY_CONFIG, subprocess_env


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # An unreachable RAY_ADDRESS: if the CLI touched Ray before validating, it would fail differently.
    env = {**subprocess_env(), "RAY_ADDRESS": "127.0.0.1:1"}
    return subprocess.run([sys.executable, "-m", "sft_dist", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("train.lr=banana", "train.lr", "valid number"),
        ("train.lrr=0.1", "train.lrr", "unknown key"),
        ("train.global_batch_size=7", "train.global_batch_size", "micro_batch_size"),
        ("data.train=/nonexistent/train.jsonl", "data.train", "file not found"),
        ("deepspeed.offload_params=true", "deepspeed.offload_params", "stage: 3"),
    ],
)
def test_bad_config_exits_2_naming_the_key_without_ray(override, key, words):
    result = cli("train", str(TINY_CONFIG), "--set", override)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and words in lines[0]
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr + result.stdout


def test_unknown_key_in_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_CONFIG.read_text().replace("  lr: 3.0e-3", "  lr: 3.0e-3\n  learning_rate: 1"))
    with pytest.raises(UserError) as err:
        config_lib.load(bad)
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "learning_rate" in text)
    assert (err.value.key, err.value.line, err.value.file) == ("train.learning_rate", line, str(bad))


def test_missing_config_file_exits_2():
    result = cli("train", "no/such/config.yaml")
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_set_coerces_types_and_resolves_paths():
    cfg = config_lib.load(TINY_CONFIG, ["train.max_steps=7", "deepspeed.stage=3", "eval.at_start=false"])
    assert (cfg.train.max_steps, cfg.deepspeed.stage, cfg.eval.at_start) == (7, 3, False)
    assert Path(cfg.data.train[0]).is_absolute() and Path(cfg.model.name_or_path).is_absolute()
    assert cfg.run_name.startswith("tiny-cpu-")


def test_resolved_config_reloads_to_the_same_config(tmp_path):
    cfg = config_lib.load(TINY_CONFIG, ["run_name=x"])
    dumped = tmp_path / "config.yaml"
    dumped.write_text(config_lib.dump(cfg))
    assert config_lib.load(dumped) == cfg


def test_too_little_data_for_one_global_batch_exits_2(tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text("\n".join((REPO / "configs/data/dates/train.jsonl").read_text().splitlines()[:2]) + "\n")
    result = cli("train", str(TINY_CONFIG), "--set", f"data.train={data}", "--set", f"output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert "data.train" in result.stderr and "fewer than one global batch of 8" in result.stderr
