"""What the data looks like, for `sft-dist data`, the run's summary.json and the driver's checks:
rows read / kept / dropped by reason, token length percentiles, the supervised fraction, duplicate rows
and validation rows that are also training rows, and how well batches use their tokens (real tokens /
tokens in padded batches) under the configured batch plan.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc

from sft_dist.data.batches import BatchPlan
from sft_dist.data.chat import IGNORE_INDEX


def reason_counts(encoded: Any) -> tuple[Counter, Counter]:
    """(bad rows by reason, other drops by reason) of an encoded part, counted in Arrow."""
    table = encoded.data.table if hasattr(encoded.data, "table") else encoded.data
    bad, dropped = Counter(), Counter()
    for is_bad, counter in ((True, bad), (False, dropped)):
        reasons = pc.filter(table.column("reason"), pc.equal(table.column("bad"), is_bad))
        for item in pc.value_counts(reasons).to_pylist():
            if item["values"] is not None:
                counter[item["values"]] += item["counts"]
    return bad, dropped


def extra_field_counts(encoded: Any) -> Counter:
    """Rows per column (or turn key) that the rows' format does not read, counted in Arrow."""
    table = encoded.data.table if hasattr(encoded.data, "table") else encoded.data
    if "extra_fields" not in table.column_names:  # the classification and image encoders' rows
        return Counter()
    names = pc.list_flatten(table.column("extra_fields"))
    return Counter({item["values"]: item["counts"] for item in pc.value_counts(names).to_pylist()})


def split_stats(
    rows_read: int, rows_kept: int, bad: Counter, dropped: Counter, examples: Any, saved: Any
) -> dict[str, Any]:
    """`examples`: the kept examples as trained on (repeated by mixing weights); `saved`: the loop's rows."""
    lengths = np.asarray(examples["length"], dtype=np.int64)
    supervised = int(np.asarray(examples["num_supervised"], dtype=np.int64).sum())
    return {
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "rows_skipped": sum(bad.values()),  # bad rows, skipped under data.on_bad_row: skip
        "dropped": dict(sorted((bad + dropped).items())),  # every dropped row, by reason
        "truncated": int(np.asarray(examples["truncated"]).sum()),
        "examples": len(examples),  # rows_kept, repeated or subsampled by the sources' mixing weights
        "tokens": int(lengths.sum()),
        "supervised_tokens": supervised,
        "supervised_fraction": round(supervised / max(int(lengths.sum()), 1), 4),
        "length_percentiles": percentiles(lengths),
        "saved_rows": len(saved),  # what the loop batches: examples, or packed rows
        "examples_per_row": round(len(examples) / max(len(saved), 1), 3),
    }


def percentiles(lengths: np.ndarray) -> dict[str, int]:
    if len(lengths) == 0:
        return {}
    points = {"min": 0, "p50": 50, "p90": 90, "p99": 99, "max": 100}
    return {name: int(np.percentile(lengths, q, method="nearest")) for name, q in points.items()}


def batching_stats(plan: BatchPlan, row_lengths: np.ndarray) -> dict[str, Any]:
    """Steps per epoch and the share of real tokens in the padded micro-batches of one epoch."""
    real = padded = 0
    for step in range(plan.steps_per_epoch):
        for rank in range(plan.world_size):
            for micro in plan.micro_batches(step, rank):
                lengths = row_lengths[micro]
                real += int(lengths.sum())
                padded += int(lengths.max()) * len(lengths)
    return {"steps_per_epoch": plan.steps_per_epoch, "global_batch_size": plan.global_batch_size,
            "micro_batch_size": plan.micro_batch_size, "grad_accum": plan.grad_accum,
            "world_size": plan.world_size, "token_efficiency": round(real / max(padded, 1), 4)}


def marked_example(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The example's text with each supervised run of tokens between [[ and ]]."""
    pieces, run, run_supervised = [], [], None
    for token, label in zip(input_ids, labels):
        supervised = label != IGNORE_INDEX
        if run and supervised != run_supervised:
            pieces.append(_piece(tokenizer, run, run_supervised))
            run = []
        run.append(token)
        run_supervised = supervised
    if run:
        pieces.append(_piece(tokenizer, run, run_supervised))
    return "".join(pieces)


def _piece(tokenizer: Any, tokens: list[int], supervised: bool) -> str:
    text = tokenizer.decode(tokens)
    return f"[[{text}]]" if supervised else text


def warnings(stats: dict[str, Any]) -> list[str]:
    """What the user should know before training on this data: repeated rows, validation rows that
    are training rows (a validation loss that measures memorisation)."""
    found = []
    for split, s in stats.items():
        if s.get("extra_fields"):
            found.append(f"{split} rows have columns their format does not read (ignored): "
                         f"{_extra_fields(s['extra_fields'])}")
        if s.get("duplicate_rows"):
            found.append(f"{s['duplicate_rows']} of the {s['rows_kept']} kept {split} rows repeat an earlier row "
                         f"(data.{split})")
    overlap = stats.get("eval", {}).get("rows_in_train")
    if overlap:
        found.append(f"{overlap} of the {stats['eval']['rows_kept']} eval rows are also training rows "
                     "(data.eval overlaps data.train): the validation metrics partly measure memorisation")
    return found


def _extra_fields(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} ({n} row{'s' if n != 1 else ''})" for name, n in sorted(counts.items()))


def report(stats: dict[str, Any], example: str | None) -> str:
    """The human-readable statistics `sft-dist data` prints."""
    lines = []
    for split, s in stats.items():
        dropped = ", ".join(f"{reason} {n}" for reason, n in s["dropped"].items()) or "none"
        held_out = f", {s['held_out']} held out for eval" if s.get("held_out") else ""
        p = s["length_percentiles"]
        lines += [
            f"{split}: {s['rows_read']} rows read, {s['rows_kept']} kept{held_out}, "
            f"{s['rows_read'] - s['rows_kept'] - s.get('held_out', 0)} dropped ({dropped}); "
            f"{s['truncated']} truncated" + (f", {s['chunked']} cut into windows" if s.get("chunked") else ""),
            f"  tokens per example: min {p.get('min')} p50 {p.get('p50')} p90 {p.get('p90')} "
            f"p99 {p.get('p99')} max {p.get('max')}",
            f"  supervised tokens: {s['supervised_tokens']:,} of {s['tokens']:,} "
            f"({100 * s['supervised_fraction']:.1f}%)",
            f"  rows: {s['saved_rows']} ({s['examples_per_row']} examples per row)",
            f"  duplicate rows: {s.get('duplicate_rows', 0)}"
            + (f"; also in train: {s['rows_in_train']}" if "rows_in_train" in s else ""),
        ]
        if s.get("extra_fields"):
            lines.append(f"  columns not read (ignored): {_extra_fields(s['extra_fields'])}")
        if "batching" in s:
            b = s["batching"]
            lines.append(
                f"  batches: {b['steps_per_epoch']} steps per epoch at global batch {b['global_batch_size']} "
                f"(micro {b['micro_batch_size']} x accum {b['grad_accum']} x {b['world_size']} workers); "
                f"token efficiency {100 * b['token_efficiency']:.1f}% (real tokens / tokens in padded batches)")
    if example is not None:
        lines += ["example (train row 0, supervised tokens between [[ and ]]):", example]
    return "\n".join(lines)
