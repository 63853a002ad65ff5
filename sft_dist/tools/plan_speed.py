"""`sft-dist plan`'s speed advice: where a setting with fewer shards fits, it says so, and by how much
`sft-dist bench` measured it faster on this machine (line 6b: each ZeRO stage's step time at 2 processes
of 1 thread over one process of 2 threads at ZeRO-0, the same global batch). Bench is the source, not a
constant here: the ratios depend on the model, the interconnect and the device."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sft_dist.errors import UserError

BENCH_FILE = "bench.json"  # what `sft-dist bench` writes by default
STEP_LINE = re.compile(r"6b ZeRO-(\d) step")


def bench_step_ratios(given: str | None) -> tuple[dict[int, float], str] | None:
    """({stage: line 6b's ratio}, the file) from the given bench JSON, else from ./bench.json if there;
    None without a file or without 6b lines (a GPU bench, an older one)."""
    path = Path(given or BENCH_FILE)
    if not path.is_file():
        if given:
            raise UserError(f"{given}: no such file (a JSON that `sft-dist bench --out` wrote)", key="--bench")
        return None
    try:
        results = json.loads(path.read_text())["results"]
        ratios = {int(m[1]): float(r["ratio"]) for r in results if (m := STEP_LINE.fullmatch(r["name"]))}
    except (ValueError, KeyError, TypeError) as bad:
        raise UserError(f"{path}: not a `sft-dist bench` result ({bad})", key="--bench") from None
    return (ratios, str(path)) if ratios else None


def advice(configured_stage: int, configured_offload: bool, fastest_stage: int, cpu_workers: int, threads: int,
           measured: tuple[dict[int, float], str] | None) -> list[str]:
    """Lines for the report: a lower stage (or no offload) that fits, and on a CPU node of several workers
    one worker of more threads; each with bench's figures where it measured them, and left out where bench
    measured it no faster."""
    ratios, source = measured or ({}, "")
    lines = []
    if fastest_stage < configured_stage or configured_offload:
        line = (f"speed: ZeRO-{fastest_stage} without offload fits too, and fewer shards are usually faster (less "
                "communication per step)")
        pair = (configured_stage, fastest_stage)
        if all(stage in ratios for stage in pair) and not configured_offload:
            line = (f"speed: ZeRO-{fastest_stage} fits too, and bench measured it at {ratios[fastest_stage]:.2f}x "
                    f"against ZeRO-{configured_stage}'s {ratios[configured_stage]:.2f}x the step time of one process "
                    f"of 2 threads ({source})") if ratios[fastest_stage] < ratios[configured_stage] else ""
        if line:
            lines.append(line + f"; deepspeed.stage: {fastest_stage}"
                         + (", deepspeed.offload_optimizer: false, deepspeed.offload_params: false"
                            if configured_offload else ""))
    if cpu_workers > 1 and fastest_stage == 0 and ratios.get(0, 2.0) > 1.0:
        line = (f"speed: on one CPU node, one worker of all {cpu_workers * threads} threads is usually faster than "
                f"{cpu_workers} processes where the model fits unsharded (no gradient exchange)")
        if 0 in ratios:
            line = (f"speed: on one CPU node, one worker of all {cpu_workers * threads} threads: bench measured 2 "
                    f"processes of 1 thread at {ratios[0]:.2f}x the step time of one process of 2 threads ({source})")
        lines.append(line + f"; ray.num_workers: 1, ray.threads_per_worker: {cpu_workers * threads}")
    if lines and measured is None:
        lines.append("speed: `sft-dist bench` measures these on this machine (line 6b); plan reads its bench.json")
    return lines
