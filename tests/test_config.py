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


@pytest.mark.parametrize("overrides, key, words", [
    (["debug.hang_in_validation={step: 1}"], "debug.hang_in_validation", "needs eval.timeout_s"),
    (["eval.timeout_s=5", "debug.hang_in_validation={step: 1, rank: 2}"], "debug.hang_in_validation.rank",
     "2 but there are 2 workers"),
])
def test_a_hang_nothing_would_end_is_refused(overrides, key, words):
    with pytest.raises(UserError, match=words) as err:
        config_lib.load(TINY_CONFIG, overrides)
    assert err.value.key == key


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


def test_a_saved_config_validates_where_its_files_do_not_exist(tmp_path):
    """A worker on another node, or export after the data moved: the saved config names the driver's
    paths, which need not exist here; only loading the user's own file checks them."""
    data, model = tmp_path / "gone" / "train.jsonl", tmp_path / "gone" / "model"
    saved = config_lib.load(TINY_CONFIG, ["run_name=x"]).model_dump(mode="json")
    saved["data"]["train"], saved["model"]["name_or_path"] = [str(data)], str(model)
    assert config_lib.RunConfig.model_validate(saved).data.train == [str(data)]
    moved = tmp_path / "config.yaml"
    moved.write_text(config_lib.dump(config_lib.RunConfig.model_validate(saved)))
    with pytest.raises(UserError) as err:
        config_lib.load(moved)
    line = next(i for i, text in enumerate(moved.read_text().splitlines(), 1) if text.startswith("data:"))
    assert (err.value.key, err.value.line) == ("data.train", line + 1) and "file not found" in err.value.message


def test_the_fingerprint_sees_a_change_of_content_that_keeps_names_and_sizes(tmp_path):
    """Same file names and sizes, other bytes: a resume would train on other data, or from another base."""
    from sft_dist import fingerprint
    from sft_dist.data.sources import content_digest

    def fingerprint_of(cfg):
        sources = cfg.data.train_sources() + cfg.data.eval_sources()
        return fingerprint.resume_fingerprint(cfg, [content_digest(s) for s in sources])

    model = tmp_path / "model"
    import shutil

    shutil.copytree(REPO / "configs" / "models" / "tiny-llama", model)
    train = tmp_path / "train.jsonl"
    train.write_text((REPO / "configs/data/dates/train.jsonl").read_text())
    cfg = config_lib.load(TINY_CONFIG, ["run_name=x", f"data.train={train}", f"model.name_or_path={model}"])
    before = fingerprint_of(cfg)
    lines = train.read_text().splitlines()
    train.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # the same bytes, reordered
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(raw))
    assert fingerprint.changed_keys(before, fingerprint_of(cfg)) == ["model", "data"]
    assert fingerprint.changed_keys(before, before) == []
