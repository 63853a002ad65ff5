"""Held-out generation's token limit: by default sized from the held-out answers (a task with ~30-token
answers is not cut at a fixed 16), and an answer that stops at the limit without its end token is marked
in samples.jsonl and in the closing before/after lines. In-process runs of the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import REPO, train_tiny

TINY_LLAMA = REPO / "configs" / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def long_answers(tmp_path_factory) -> Path:
    """The dates task with sentence-long answers (about 30 tokens each)."""
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    rows = [json.loads(line) for line in (REPO / "configs/data/dates/eval.jsonl").read_text().splitlines()[:12]]
    for row in rows:
        iso = row["messages"][-1]["content"]
        row["messages"][-1]["content"] = f"In ISO 8601 form, with the year first, this date is written as {iso}."
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def samples(run: Path) -> list[list[dict]]:
    return [e["samples"] for e in map(json.loads, (run / "samples.jsonl").read_text().splitlines())]


def run(tmp_path: Path, data: Path, *overrides: str) -> Path:
    return train_tiny(tmp_path, "train.max_steps=1", "train.micro_batch_size=1", f"data.train={data}",
                      f"data.eval={data}", "eval.generate.num_prompts=2", "ray.num_workers=1", *overrides,
                      extra_args=("--no-ray",))


def test_the_default_limit_covers_the_longest_held_out_answer(long_answers, tmp_path):
    finished = run(tmp_path, long_answers, "eval.generate.max_new_tokens=null", "eval.at_start=false")
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    # The tiny model's template closes an answer with "<|im_end|>\n".
    longest = max(len(tokenizer(s["expected"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
                  for s in samples(finished)[-1])
    assert longest > 16  # the quickstart's former fixed limit would have cut every one
    assert {s["max_new_tokens"] for s in samples(finished)[-1]} == {longest + max(8, longest // 4)}


def test_an_answer_cut_at_the_limit_is_marked_and_said_so(long_answers, tmp_path, capsys):
    finished = run(tmp_path, long_answers, "eval.generate.max_new_tokens=3")
    for sample in [s for step in samples(finished) for s in step]:
        # The untrained model does not end a turn within 3 tokens.
        assert sample["hit_max_new_tokens"] and sample["max_new_tokens"] == 3
    out = capsys.readouterr().out
    assert out.count("(stopped at max_new_tokens=3 without an end token)") == 4  # 2 prompts, before and after
