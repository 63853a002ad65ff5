"""Driver-side preparation: rows → validated conversations → tokens with labels, written once to an
Arrow cache that every worker memory-maps. Runs before any worker starts, so no worker sits in a
collective while another tokenizes, and a second run on the same data and tokenizer skips the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from sft_dist.config import DataConfig, EvalConfig
from sft_dist.data.chat import generation_prompt, tokenize_conversation
from sft_dist.data.formats import to_messages
from sft_dist.data.sources import BadRow, BadRowPolicy, read_jsonl
from sft_dist.errors import UserError

# Per-call progress bars are noise on the driver's console; the data stats say what happened.
datasets.disable_progress_bars()

CACHE_FORMAT_VERSION = "1"  # bump when the tokenized layout or masking rules change


@dataclass(frozen=True)
class SplitStats:
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    tokens: int
    supervised_tokens: int
    truncated: int


@dataclass(frozen=True)
class PreparedData:
    train_dir: str
    eval_dir: str | None
    stats: dict[str, dict] = field(default_factory=dict)
    prompts: list[dict[str, Any]] = field(default_factory=list)  # held-out generation prompts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare(data: DataConfig, eval_cfg: EvalConfig, tokenizer: Any, cache_root: Path) -> PreparedData:
    splits = {"train": data.train_files(), "eval": data.eval_files()}
    dirs, stats, eval_rows = {}, {}, []
    for split, files in splits.items():
        if not files:
            continue
        rows, policy = _read_conversations(files, data.on_bad_row)
        if split == "eval":
            eval_rows = rows
        key = _cache_key(files, data, tokenizer)
        dirs[split], stats[split] = _tokenize_cached(rows, policy, data, tokenizer, cache_root / key / split)
    prompts = []
    if eval_cfg.generate and eval_rows:
        for messages in eval_rows[: eval_cfg.generate.num_prompts]:
            prompt, expected = generation_prompt(messages)
            prompts.append({"messages": prompt, "expected": expected})
    return PreparedData(dirs["train"], dirs.get("eval"), stats, prompts)


def _read_conversations(files: list[str], on_bad_row: str) -> tuple[list[list[dict]], BadRowPolicy]:
    policy = BadRowPolicy(on_bad_row)
    conversations = []
    for row in read_jsonl(files, policy):
        try:
            conversations.append(to_messages(row.data))
        except BadRow as bad:
            policy.handle(bad, row.file, row.line)
    if not conversations:
        raise UserError(f"no usable rows (skipped by reason: {dict(policy.skipped)})", file=", ".join(files))
    return conversations, policy


def _tokenize_cached(
    conversations: list[list[dict]], policy: BadRowPolicy, data: DataConfig, tokenizer: Any, out: Path
) -> tuple[str, dict]:
    stats_file = out / "stats.json"
    if stats_file.is_file():  # written last: its presence means the cache is complete
        return str(out), json.loads(stats_file.read_text())

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        rows = [tokenize_conversation(tokenizer, m, data.max_seq_len, data.loss_on) for m in batch["messages"]]
        return {k: [r[k] for r in rows] for k in ("input_ids", "labels", "num_supervised", "truncated")}

    dataset = datasets.Dataset.from_dict({"messages": conversations})
    dataset = dataset.map(tokenize, batched=True, remove_columns=["messages"], desc="tokenizing")
    no_supervision = sum(n == 0 for n in dataset["num_supervised"])
    dataset = dataset.filter(lambda n: n > 0, input_columns="num_supervised")
    if len(dataset) == 0:
        raise UserError("every example was left with zero supervised tokens (check data.max_seq_len)")
    dropped = dict(policy.skipped) | ({"no_supervised_tokens": no_supervision} if no_supervision else {})
    lengths = [len(ids) for ids in dataset["input_ids"]]
    stats = SplitStats(
        rows_read=len(conversations) + sum(policy.skipped.values()),
        rows_kept=len(dataset),
        dropped=dropped,
        tokens=sum(lengths),
        supervised_tokens=int(sum(dataset["num_supervised"])),
        truncated=int(sum(dataset["truncated"])),
    )
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return str(out), asdict(stats)


def _cache_key(files: list[str], data: DataConfig, tokenizer: Any) -> str:
    digest = hashlib.sha256(CACHE_FORMAT_VERSION.encode())
    for f in files:
        digest.update(f.encode())
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(json.dumps([data.format, data.max_seq_len, data.loss_on, data.on_bad_row]).encode())
    return digest.hexdigest()[:16]
