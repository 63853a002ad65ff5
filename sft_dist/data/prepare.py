"""Driver-side preparation: sources → encoded rows → kept examples → (packed) rows, written once to an
Arrow cache that every worker memory-maps. Runs before any worker starts, so no worker sits in a
collective while another tokenizes; a second run with the same data, tokenizer, template and settings
finds the cache and skips the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from sft_dist.config import DataConfig, EvalConfig, SourceConfig
from sft_dist.data import stats as stats_lib
from sft_dist.data.audio import undecoded as audio_undecoded
from sft_dist.data.badrows import BadRow, Origin, bad_row_error
from sft_dist.data.chat import generation_prompt
from sft_dist.data.encode import BOOKKEEPING, Encoder, raw_row
from sft_dist.data.formats import Chat, normalize
from sft_dist.data.images import undecoded
from sft_dist.data.packing import chunk, pack
from sft_dist.data.sources import Part, content_digest, fingerprint, first_line, open_source
from sft_dist.data.templates import chat_template
from sft_dist.errors import UserError
from sft_dist.tasks import task_of

# Per-call progress bars are noise on the driver's console; the data stats say what happened.
datasets.disable_progress_bars()

CACHE_FORMAT_VERSION = "6"  # bump when the saved layout, masking, packing rules or statistics change
COMPLETE = "prepared.json"  # written last: a cache folder without it is incomplete
ROWS_PER_PROCESS = 20_000  # below this, starting tokenizer processes costs more than it saves


@dataclass(frozen=True)
class PreparedData:
    train_dir: str
    eval_dir: str | None
    stats: dict[str, dict] = field(default_factory=dict)
    prompts: list[dict[str, Any]] = field(default_factory=list)  # held-out generation prompts
    # The content of every training source, then every evaluation source (sources.content_digest).
    source_digests: list[Any] = field(default_factory=list)
    # What a checkpoint of this run depends on (sft_dist.fingerprint), set by the driver.
    fingerprint: dict[str, Any] = field(default_factory=dict)
    # Where nodes that do not share the driver's disk find this data and the model (sft_dist.shipping).
    shipment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Encoded:
    """One source after encoding: every row, kept or not, per part, with the counts of what was dropped."""

    source: SourceConfig
    parts: list[tuple[Part, datasets.Dataset]]
    bad: Counter
    dropped: Counter
    empty_files: list[str]


def prepare(data: DataConfig, eval_cfg: EvalConfig, tokenizer: Any, cache_root: Path,
            labels: list[str] | None = None) -> PreparedData:
    """`labels`: the label names (in id order) of a classification format's rows; `tokenizer`: None for
    images (they are saved as files' bytes, so the rows do not depend on the image processor)."""
    template = _template(data, tokenizer)
    num_prompts = eval_cfg.generate.num_prompts if eval_cfg.generate else 0
    key = cache_key(data, tokenizer, template, num_prompts, labels)
    out = cache_root / key
    if not (out / COMPLETE).is_file():
        tmp = cache_root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "work").mkdir(parents=True)
        try:
            encoder = _encoder(data, tokenizer, template, labels)
            summary = _build(data, encoder, num_prompts, tmp)
            summary["source_digests"] = [content_digest(s) for s in data.train_sources() + data.eval_sources()]
            (tmp / COMPLETE).write_text(json.dumps(summary, indent=1))
        except BaseException:  # a bad row, a full disk, Ctrl+C: nothing half-prepared stays in the cache
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(tmp / "work", ignore_errors=True)  # intermediate tables; the saved rows are copies
        if (out / COMPLETE).is_file():  # another run prepared the same data meanwhile
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    summary = json.loads((out / COMPLETE).read_text())
    eval_dir = out / "eval"
    return PreparedData(str(out / "train"), str(eval_dir) if eval_dir.is_dir() else None,
                        summary["stats"], summary["prompts"], summary["source_digests"])


def _encoder(data: DataConfig, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    return task_of(data).encoder(data, tokenizer, template, labels)


def _template(data: DataConfig, tokenizer: Any) -> str | None:
    formats = {data.for_source(s).format for s in data.train_sources() + data.eval_sources()}
    if formats & {"messages", "alpaca"}:
        return chat_template(tokenizer, data.chat_template)
    if "prompt_completion" in formats and (data.chat_template or tokenizer.chat_template):
        return chat_template(tokenizer, data.chat_template)  # for conversational prompt/completion rows
    return None


def _build(data: DataConfig, encoder: Encoder, num_prompts: int, out: Path) -> dict[str, Any]:
    work = out / "work"
    train = [_encode_source(s, i, encoder, data, work) for i, s in enumerate(data.train_sources())]
    evals = [_encode_source(s, i, encoder, data, work / "eval") for i, s in enumerate(data.eval_sources())]
    fraction = data.eval_fraction()
    splits = {"train": (train, False)}
    if evals or fraction:
        splits["eval"] = (evals or train, True)
    stats, keys = {}, {}
    for split, (encoded, heldout) in splits.items():
        stats[split] = _save_split(split, encoded, heldout, data, out)
        keys[split] = _content_keys(encoded, heldout if fraction else None, fraction)
        stats[split]["duplicate_rows"] = int(len(keys[split]) - len(np.unique(keys[split])))
    if "eval" in splits:
        stats["eval"]["rows_in_train"] = int(np.isin(keys["eval"], keys["train"]).sum())
    prompts = _prompts(splits["eval"][0], fraction, num_prompts, data) if "eval" in splits else []
    return {"stats": stats, "prompts": prompts}


def _save_split(split: str, encoded: list[Encoded], heldout: bool, data: DataConfig, out: Path) -> dict[str, Any]:
    """Select the split's examples, weight, pack and save them; returns the split's statistics."""
    fraction, weighted, kept = data.eval_fraction(), [], 0
    for source in encoded:
        for _part, table in source.parts:
            examples = _kept(table, heldout if fraction else None, fraction)
            kept += len(examples)
            weighted.append(examples if split == "eval" else _weighted(examples, source.source))
    if not kept:
        raise _nothing_usable(split, encoded, data)
    # (concatenate_datasets hashes its inputs for a fingerprint: seconds, for nothing, with one input)
    examples = weighted[0] if len(weighted) == 1 else datasets.concatenate_datasets(weighted)
    saved = examples.select_columns([c for c in examples.column_names if c not in BOOKKEEPING])
    chunked = 0
    if data.packing:
        (out / "work" / split).mkdir(parents=True, exist_ok=True)
        saved, chunked = chunk(saved, data.max_seq_len, out / "work" / split)
        saved = pack(saved, data.max_seq_len, out / "work" / split)
    saved.save_to_disk(str(out / split))
    if split == "eval" and fraction:  # held out of the training rows: what was read and dropped is on train
        rows_read, bad, dropped = kept, Counter(), Counter()
    else:
        rows_read = sum(len(t) for s in encoded for _p, t in s.parts)
        bad, dropped = sum((s.bad for s in encoded), Counter()), sum((s.dropped for s in encoded), Counter())
    stats = stats_lib.split_stats(rows_read, kept, bad, dropped, examples, saved)
    stats["chunked"] = chunked  # plain texts longer than max_seq_len, trained as windows of it
    stats["empty_files"] = [f for s in encoded for f in s.empty_files] if split == "train" or not fraction else []
    if split == "train" and fraction:
        stats["held_out"] = sum(len(_kept(t, True, fraction)) for s in encoded for _p, t in s.parts)
    if split == "train" or not fraction:
        extra = sum((stats_lib.extra_field_counts(t) for s in encoded for _p, t in s.parts), Counter())
        stats["extra_fields"] = dict(sorted(extra.items()))
    return stats


def _content_keys(encoded: list[Encoded], heldout: bool | None, fraction: float | None) -> np.ndarray:
    """A number per kept row fixed by its content (the held-out split's own), before mixing weights
    repeat rows: equal numbers are duplicate rows."""
    # Read through the selection (`.data.table` would be the whole table: every row, dropped ones included,
    # once the kept rows are not one contiguous run).
    parts = [np.asarray(_kept(table, heldout, fraction)["heldout_u"], dtype=np.float64)
             for source in encoded for _part, table in source.parts]
    return np.concatenate(parts) if parts else np.zeros(0)


def _encode_source(source: SourceConfig, index: int, encoder: Encoder, data: DataConfig, work: Path) -> Encoded:
    """Encode every part of a source; under on_bad_row: error, stop at the first bad row (or empty file)."""
    parts, problems = open_source(source, data.streaming, work)
    for bad, origin in problems:
        if data.on_bad_row == "error":
            raise bad_row_error(bad.reason, bad.detail, origin)
    result = Encoded(source, [], Counter(), Counter(), [origin.file for _bad, origin in problems])
    if isinstance(encoder, Encoder):  # chat and text rows: a source may set its own format, fields, roles
        encoder = encoder.for_source(source)
    for k, part in enumerate(parts):
        table = _encode_part(part, encoder, data, work / f"source{index}-part{k}")
        bad, dropped = stats_lib.reason_counts(table)
        if bad and data.on_bad_row == "error":
            raise _first_bad_row(table, part)
        result.parts.append((part, table))
        result.bad.update(bad)
        result.dropped.update(dropped)
    return result


def _encode_part(part: Part, encoder: Encoder, data: DataConfig, work: Path) -> datasets.Dataset:
    work.mkdir(parents=True, exist_ok=True)
    dataset, features = part.dataset, encoder.features
    if hasattr(encoder, "for_part"):  # image and audio rows: relative paths start at this part's file
        for key in ("image_key", "mask_key"):  # Image columns kept as their bytes
            dataset = undecoded(dataset, getattr(encoder, key)) if hasattr(encoder, key) else dataset
        if hasattr(encoder, "audio_key"):  # Audio columns alike
            dataset = audio_undecoded(dataset, encoder.audio_key)
        encoder = encoder.for_part(part.name)
    if isinstance(dataset, datasets.IterableDataset):
        # Streaming: rows are read and encoded on the fly; only the encoded rows are written.
        try:
            return datasets.Dataset.from_generator(
                _encoded_stream, features=features, gen_kwargs={"stream": dataset, "encoder": encoder},
                cache_dir=str(work), fingerprint=hashlib.sha256(str(work).encode()).hexdigest()[:16])
        except datasets.exceptions.DatasetGenerationError as err:  # a reader failed mid-stream
            raise UserError(f"cannot read this source: {first_line(err)}", file=part.name) from None
    num_proc = data.num_proc or min(len(os.sched_getaffinity(0)), len(dataset) // ROWS_PER_PROCESS) or None
    if num_proc and num_proc > 1:
        # The map forks: the Rust tokenizer's own thread pool would warn and serialize in each child.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return dataset.map(
        encoder, batched=True, with_indices=True, remove_columns=dataset.column_names, features=features,
        num_proc=num_proc, cache_file_name=str(work / "encoded.arrow"), load_from_cache_file=False)


def _encoded_stream(stream: datasets.IterableDataset, encoder: Encoder, batch_size: int = 1000):
    start = 0
    for batch in stream.iter(batch_size=batch_size):
        count = len(next(iter(batch.values())))
        out = encoder(batch, list(range(start, start + count)))
        start += count
        for j in range(count):
            yield {name: column[j] for name, column in out.items()}


def _first_bad_row(table: datasets.Dataset, part: Part) -> UserError:
    index = pc.index(table.data.table.column("bad"), True).as_py()
    row = table[index]
    return bad_row_error(row["reason"], row["detail"], Origin(part.name, row["line"], row["row"]))


def _kept(table: datasets.Dataset, heldout: bool | None, fraction: float | None) -> datasets.Dataset:
    """The kept rows; with a held-out fraction, only the held-out (or only the other) rows."""
    columns = table.data.table
    keep = pc.is_null(columns.column("reason"))
    if heldout is not None:
        side = pc.less(columns.column("heldout_u"), fraction)
        keep = pc.and_(keep, side if heldout else pc.invert(side))
    return table.select(np.flatnonzero(keep.to_numpy(zero_copy_only=False)))


def _weighted(examples: datasets.Dataset, source: SourceConfig) -> datasets.Dataset:
    """Each row `weight` times: whole copies, plus a fixed subset (seeded by the source) for the fraction."""
    if source.weight == 1:
        return examples
    whole, fraction = divmod(source.weight, 1)
    n = len(examples)
    seed = int.from_bytes(hashlib.sha256(source.path.encode()).digest()[:8], "big")
    extra = np.random.default_rng(seed).permutation(n)[: round(fraction * n)]
    return examples.select(np.sort(np.concatenate([np.tile(np.arange(n), int(whole)), extra])))


def _nothing_usable(split: str, encoded: list[Encoded], data: DataConfig) -> UserError:
    bad = sum((s.bad for s in encoded), Counter())
    dropped = sum((s.dropped for s in encoded), Counter())
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted((bad + dropped).items())) or "no rows"
    names = ", ".join(s.source.path for s in encoded)
    hint = " (check data.max_seq_len and data.loss_on)" if dropped else ""
    return UserError(f"no usable {split} rows (dropped: {counts}){hint}", file=names,
                     key="data.eval" if split == "eval" else "data.train")


def _prompts(encoded: list[Encoded], fraction: float | None, num_prompts: int, data: DataConfig) -> list[dict]:
    """The first kept eval conversations, split before their last assistant turn, for generation."""
    prompts = []
    for source in encoded:
        for part, table in source.parts:
            for index in _kept(table, True if fraction else None, fraction)["row"][: num_prompts - len(prompts)]:
                example = normalize(raw_row(_raw_batch(part, index), 0), data.for_source(source.source))
                if isinstance(example, Chat):
                    prompt, expected = generation_prompt(example.messages)
                    tools = {"tools": example.tools} if example.tools else {}  # rendered as in training
                    prompts.append({"messages": prompt, "expected": expected, **tools})
    return prompts[:num_prompts]


def _raw_batch(part: Part, index: int) -> dict[str, list]:
    if isinstance(part.dataset, datasets.Dataset):
        return part.dataset[index : index + 1]
    for k, row in enumerate(part.dataset):  # a stream: read again up to the row (prompts come first)
        if k == index:
            return {name: [value] for name, value in row.items()}
    raise BadRow("missing_row", f"row {index} is no longer in the stream")


def cache_key(data: DataConfig, tokenizer: Any, template: str | None, num_prompts: int,
              labels: list[str] | None = None) -> str:
    """The data (files by path, size and mtime), tokenizer, template and every setting that changes rows."""
    payload = {
        "version": CACHE_FORMAT_VERSION,
        # num_proc and streaming change how the rows are made, not which rows.
        # Augmentation happens per batch on the workers: not part of the saved rows.
        "data": data.model_dump(mode="json", exclude={"num_proc", "streaming", "image_augment", "audio_augment"}),
        "sources": [fingerprint(s) for s in data.train_sources() + data.eval_sources()],
        "template": template,
        "num_prompts": num_prompts,
    }
    if labels:
        payload["labels"] = labels
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    if tokenizer is None:  # images: the rows hold the images' bytes, whatever the image processor
        return digest.hexdigest()[:16]
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend else json.dumps(sorted(tokenizer.get_vocab().items()))).encode())
    return digest.hexdigest()[:16]


def row_lengths(rows_dir: str) -> np.ndarray:
    """Token count of each saved row (an example, or a packed row)."""
    return np.asarray(datasets.load_from_disk(rows_dir)["length"], dtype=np.int64)


def first_example(rows_dir: str) -> tuple[list[int], list[int]]:
    """The first example of the saved rows (the first one packed into row 0 when packing)."""
    row = datasets.load_from_disk(rows_dir)[0]
    length = row["seq_lens"][0] if "seq_lens" in row else row["length"]
    return row["input_ids"][:length], row["labels"][:length]
