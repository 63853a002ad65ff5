"""Sources (JSONL, JSON, Parquet, CSV, globs, folders, save_to_disk, hub names), streaming, mixing
weights, the held-out eval fraction, and the tokenization cache."""

from __future__ import annotations

import json
import os

import datasets
import pandas as pd
import pytest

from sft_dist.data import prepare as prepare_lib
from sft_dist.errors import UserError

from fixtures.data import chat, rows, run_prepare, write_jsonl


def saved_ids(prepared, split: str = "train") -> list[list[int]]:
    return datasets.load_from_disk(prepared.train_dir if split == "train" else prepared.eval_dir)["input_ids"]


@pytest.fixture
def twelve(tmp_path):
    """The same 12 conversations as JSONL, a JSON array, Parquet, a save_to_disk folder and split files."""
    items = rows(12)
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", items[:5])
    write_jsonl(folder / "b.jsonl", items[5:])
    (tmp_path / "all.json").write_text(json.dumps(items))
    pd.DataFrame(items).to_parquet(tmp_path / "all.parquet")
    datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(items[:2]),
                          "test": datasets.Dataset.from_list(items)}).save_to_disk(str(tmp_path / "dict"))
    return tmp_path


@pytest.mark.parametrize("source", [
    "{tmp}/parts/a.jsonl,{tmp}/parts/b.jsonl", "{tmp}/parts/*.jsonl", "{tmp}/parts", "{tmp}/all.json",
    "{tmp}/all.parquet", "{tmp}/saved", "dict:test",
])
def test_every_kind_of_local_source_gives_the_same_rows(twelve, source):
    reference = saved_ids(run_prepare(twelve / "ref", str(twelve / "parts" / "*.jsonl")))
    if source == "dict:test":
        train = {"path": str(twelve / "dict"), "split": "test"}
    else:
        train = [s.format(tmp=twelve) for s in source.split(",")]
    assert saved_ids(run_prepare(twelve / "out", train)) == reference


def test_streaming_reads_the_same_rows(twelve):
    for source in (str(twelve / "parts"), str(twelve / "all.parquet"), str(twelve / "saved")):
        assert saved_ids(run_prepare(twelve / "s1", source, streaming=True)) == \
            saved_ids(run_prepare(twelve / "s2", source))


def test_csv_cells_are_read_as_text(tmp_path):
    path = tmp_path / "a.csv"
    pd.DataFrame({"instruction": ["Add 1 and 1", "Add 2 and 2"], "output": [2, 4]}).to_csv(path, index=False)
    stats = run_prepare(tmp_path, str(path), format="alpaca").stats["train"]
    assert (stats["rows_kept"], stats["dropped"]) == (2, {})


def test_a_hub_name_offline_fails_with_one_clear_message(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        run_prepare(tmp_path, {"path": "some-org/some-dataset", "config": "default", "split": "train"})
    message = str(err.value)
    assert message.startswith("some-org/some-dataset: cannot load hub dataset") and "Offline?" in message


def test_mixing_weights_repeat_or_subsample_each_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", rows(10, start=100))
    stats = run_prepare(tmp_path, [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}]).stats["train"]
    assert (stats["rows_kept"], stats["examples"]) == (20, 25)
    again = run_prepare(tmp_path / "again", [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}])
    assert saved_ids(again) == saved_ids(run_prepare(tmp_path, [{"path": str(a), "weight": 2},
                                                                {"path": str(b), "weight": 0.5}]))


def test_held_out_fraction_is_disjoint_and_the_same_every_run(tmp_path):
    items = rows(200) + [chat("What is 0 plus 0?", "0")] * 5  # duplicates of row 0
    path = write_jsonl(tmp_path / "a.jsonl", items)
    first = run_prepare(tmp_path / "one", str(path), eval=0.2, num_prompts=2)
    second = run_prepare(tmp_path / "two", str(path), eval=0.2, num_prompts=2)
    train, held_out = saved_ids(first), saved_ids(first, "eval")
    assert saved_ids(second, "eval") == held_out and saved_ids(second) == train
    assert not {tuple(r) for r in train} & {tuple(r) for r in held_out}  # duplicates land on one side
    assert 20 <= len(held_out) <= 60 and len(train) + len(held_out) == 205
    assert first.stats["train"]["held_out"] == len(held_out) == first.stats["eval"]["rows_kept"]
    assert len(first.prompts) == 2 and first.prompts[0]["messages"][-1]["role"] == "user"


def test_a_second_run_reuses_the_cache_and_a_changed_file_does_not(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", rows(6))
    first = run_prepare(tmp_path, str(path))
    monkeypatch.setattr(prepare_lib, "_build", lambda *args: pytest.fail("tokenized again"))
    assert run_prepare(tmp_path, str(path)) == first
    monkeypatch.undo()
    assert run_prepare(tmp_path, str(path), max_seq_len=100).train_dir != first.train_dir
    write_jsonl(path, rows(7))
    os.utime(path, ns=(1, 1))  # a different mtime even within the filesystem's time resolution
    changed = run_prepare(tmp_path, str(path))
    assert changed.train_dir != first.train_dir and changed.stats["train"]["rows_kept"] == 7
