"""Bad input fails fast, as one line and exit code 2, before anything distributed starts.

The cases found before the data is read run `sft-dist train` as its own process (as a user would),
with a private Ray temp folder: had anything started Ray, the folder would exist. Those found while
preparing the data run in this process (the libraries are loaded already) with an unreachable
RAY_ADDRESS: connecting would fail differently. The config-error case is timed against `import torch`
in the same test, as a ratio, because this machine's speed varies with its load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG, subprocess_env
from fixtures.data import DATES, TINY_MODEL, chat, rows, run_prepare, write_jsonl

TIMEOUT_S = 120


def sft_dist(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m sft_dist ARGS` in a clean environment whose Ray would keep its files in tmp_path/raytmp."""
    env = {**subprocess_env(), "RAY_TMPDIR": str(tmp_path / "raytmp"), **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "sft_dist", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def model_without(tmp_path: Path, *missing: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder, ignore=shutil.ignore_patterns(*missing))
    return folder


def whitespace_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n   \n\t\n\n")
    return path


def taken_run(tmp_path: Path) -> str:
    (tmp_path / "out" / "run").mkdir(parents=True)
    (tmp_path / "out" / "run" / "metrics.jsonl").write_text("{}\n")
    return "run"


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    return path


# (case, the --set overrides made from tmp_path, what the one line must say, extra environment)
CASES = {
    "model folder without weights": (lambda t: [f"model.name_or_path={model_without(t, '*.safetensors')}"],
                                      "has no weights", {}),
    "empty model folder": (lambda t: [f"model.name_or_path={model_without(t, '*')}"], "has no config.json", {}),
    "existing run_name": (lambda t: [f"run_name={taken_run(t)}"], "already exists", {}),
    "output_dir is a file": (lambda t: [f"output_dir={a_file(t)}"], "is a file", {}),
    # Port 9 (discard) refuses at once; an empty HF_HOME has nothing cached.
    "hub name without network": (lambda t: ["model.name_or_path=no-such-org/no-such-model"], "not in the local cache",
                                 {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "{tmp}/hf"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_before_ray(tmp_path, case):
    make_overrides, expected, env = CASES[case]
    overrides = [f"output_dir={tmp_path / 'out'}", "run_name=run", *make_overrides(tmp_path)]
    started = time.monotonic()
    done = sft_dist(tmp_path, "train", str(TINY_CONFIG), *[a for o in overrides for a in ("--set", o)],
                    env={k: v.format(tmp=tmp_path) for k, v in env.items()})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr
    assert not (tmp_path / "raytmp").exists()  # no Ray session was created
    assert time.monotonic() - started < 60  # a hub name without network used to take 52 s to fail


def train_in_process(tmp_path: Path, capsys, monkeypatch, *overrides: str, no_ray: bool = False) -> tuple[int, str]:
    from sft_dist.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing may connect to Ray before this fails
    code = main(["train", str(TINY_CONFIG), *(["--no-ray"] if no_ray else []), "--set", f"output_dir={tmp_path}",
                 *[a for o in overrides for a in ("--set", o)]])
    return code, capsys.readouterr().err.strip()


def test_whitespace_only_jsonl_is_an_empty_file(tmp_path, capsys, monkeypatch):
    blank = whitespace_jsonl(tmp_path)
    code, err = train_in_process(tmp_path, capsys, monkeypatch, f"data.train={blank}")
    assert code == 2 and err.startswith(f"error: {blank}: empty_file: the file has no rows") and "\n" not in err


def test_no_ray_batch_error_names_the_process_not_ray_num_workers(tmp_path, capsys, monkeypatch):
    few = write_jsonl(tmp_path / "few.jsonl", rows(3))
    code, err = train_in_process(tmp_path, capsys, monkeypatch, f"data.train={few}", "data.eval=null",
                                 "eval.generate=null", no_ray=True)
    assert code == 2 and "\n" not in err
    assert "x 1 process (--no-ray)" in err and "ray.num_workers" not in err


def test_a_config_error_returns_in_a_fraction_of_import_torch(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY_CONFIG.read_text().replace("  lr: 3.0e-3", "  lrr: 3.0e-3"))
    env = subprocess_env()

    def seconds(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
        started = time.monotonic()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        return time.monotonic() - started, done

    torch_s, _ = seconds([sys.executable, "-c", "import torch"])
    error_s, done = seconds([sys.executable, "-m", "sft_dist", "train", str(typo)])
    line = typo.read_text().splitlines().index("  lrr: 3.0e-3") + 1
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: {typo}:{line}: train.lrr: unknown key (check the spelling; see the config reference in README.md)")
    # It imported torch, transformers and DeepSpeed before parsing: slower than `import torch` itself.
    assert error_s < 0.5 * torch_s, (error_s, torch_s)


def test_data_counts_duplicates_overlap_and_what_truncation_dropped(tmp_path):
    train_rows = rows(6) + rows(2)  # rows 0 and 1 twice
    long_prompt = chat(" ".join(f"word{i}" for i in range(600)), "yes")  # the cut takes the whole answer
    train = write_jsonl(tmp_path / "train.jsonl", [*train_rows, long_prompt])
    eval_ = write_jsonl(tmp_path / "eval.jsonl", rows(3, start=4) + rows(2, start=100))  # rows 4, 5 in train
    data = run_prepare(tmp_path, str(train), eval=[str(eval_)])
    s = data.stats
    assert (s["train"]["duplicate_rows"], s["eval"]["duplicate_rows"], s["eval"]["rows_in_train"]) == (2, 0, 2)
    # Dropped as too long (it was), not as unsupervised with "0 truncated".
    assert s["train"]["dropped"] == {"too_long": 1} and s["train"]["truncated"] == 0
    from sft_dist.data.stats import warnings

    assert warnings(s) == [
        "2 of the 8 kept train rows repeat an earlier row (data.train)",
        "2 of the 5 eval rows are also training rows (data.eval overlaps data.train): the validation metrics "
        "partly measure memorisation"]


def test_data_equal_to_train_is_counted_whole(tmp_path):
    data = run_prepare(tmp_path, str(DATES / "train.jsonl"), eval=[str(DATES / "train.jsonl")])
    assert data.stats["eval"]["rows_in_train"] == data.stats["eval"]["rows_kept"] > 0


def test_a_failed_preparation_leaves_no_temporary_folder(tmp_path):
    from sft_dist.errors import UserError

    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows(3), '{"messages": [}'])
    with pytest.raises(UserError, match="malformed_json"):
        run_prepare(tmp_path, str(bad))
    assert list((tmp_path / "cache").iterdir()) == []


def test_local_cluster_token_file_is_owner_only(tmp_path):
    """start.sh leaves the Ray token readable by its owner only: `ray get-auth-token --generate` writes it
    0644 (a token from before is the same), so the script tightens it. Nodes that look alive (this
    process, as the head and the one worker node) make the script stop right after, starting nothing."""
    nodes = tmp_path / "ray" / "sft_dist_nodes"
    nodes.mkdir(parents=True)
    for node in ("head", "worker-1"):  # a stopped worker node would be started again
        (nodes / f"{node}.pid").write_text(str(os.getpid()))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("0123456789abcdef" * 4)
    token.chmod(0o644)  # as Ray writes it
    env = {**subprocess_env(), "HOME": str(tmp_path), "SFT_DIST_RAY_TEMP_DIR": str(tmp_path / "ray"),
           "RAY_BIN": str(Path(sys.executable).parent / "ray")}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    done = subprocess.run(["bash", "cluster/local/start.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0 and "already running" in done.stderr, done.stderr
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.read_text() not in done.stdout + done.stderr  # never printed
