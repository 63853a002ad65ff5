"""`sft-dist data` and the data errors of `sft-dist train`: statistics printed, exit code 2 with the
file and line of a bad row, and a skipped row counted in summary.json of a run that trains."""

from __future__ import annotations

import json
import re

import pytest

from sft_dist.cli import main

from conftest import TINY_CONFIG, train_tiny
from fixtures.data import DATES


@pytest.fixture
def broken_line_3(tmp_path):
    lines = (DATES / "train.jsonl").read_text().splitlines()[:40]
    lines.insert(2, '{"messages": [{"role": "user", "content": "no closing quote')
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("packing", [False, True])
def test_data_command_prints_statistics_and_a_marked_example(tmp_path, capsys, packing):
    code = main(["data", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", f"data.packing={packing}"])
    out = capsys.readouterr().out
    assert code == 0
    num_train, num_eval = (len((DATES / f).read_text().splitlines()) for f in ("train.jsonl", "eval.jsonl"))
    assert f"train: {num_train} rows read, {num_train} kept, 0 dropped" in out
    assert f"eval: {num_eval} rows read, {num_eval} kept" in out
    assert "tokens per example: min" in out and "supervised tokens:" in out and "token efficiency" in out
    rows = int(re.search(r"rows: (\d+) \(([\d.]+) examples per row", out).group(1))
    assert rows < num_train / 1.5 if packing else rows == num_train
    assert f"batches: {rows // 8} steps per epoch at global batch 8" in out
    # An example with only the answer and its end token supervised (row 0 of the file, when not packed).
    first = json.loads((DATES / "train.jsonl").read_text().splitlines()[0])["messages"]
    if not packing:
        assert f"{first[0]['content']}<|im_end|>\n<|im_start|>assistant\n[[{first[1]['content']}<|im_end|>]]" in out
    assert re.search(r"<\|im_start\|>assistant\n\[\[\d{4}-\d\d-\d\d<\|im_end\|>\]\]\n", out)
    assert out.count("[[") == 2  # the heading that explains the markers, and the one answer


def test_data_command_exits_2_naming_the_bad_line(tmp_path, capsys, broken_line_3):
    code = main(["data", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", f"data.train={broken_line_3}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {broken_line_3}:3: malformed_json") and len(err.splitlines()) == 1


def test_train_exits_2_naming_the_bad_line_before_anything_distributed(tmp_path, capsys, broken_line_3,
                                                                      monkeypatch):
    # An unreachable RAY_ADDRESS: a data error must stop the run before it connects to anything.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    code = main(["train", str(TINY_CONFIG), "--set", f"output_dir={tmp_path}", "--set", f"data.train={broken_line_3}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {broken_line_3}:3: malformed_json") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists() and "Traceback" not in err


def test_with_skip_the_run_trains_and_counts_the_skipped_row_in_its_summary(tmp_path, broken_line_3):
    run_dir = train_tiny(tmp_path, f"data.train={broken_line_3}", "data.on_bad_row=skip", "train.max_steps=2",
                         "eval.at_start=false", "eval.generate=null", extra_args=("--no-ray",))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("completed", 2)
    train_stats = summary["data"]["train"]
    assert (train_stats["rows_read"], train_stats["rows_kept"], train_stats["rows_skipped"]) == (41, 40, 1)
    assert train_stats["dropped"] == {"malformed_json": 1}
