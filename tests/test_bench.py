"""`sft-dist bench --quick` runs end to end on the tiny model and writes its JSON (a smoke test: the
figures are timings on a shared machine, so only their presence and sanity are checked)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env

NAMES = ["1 framework overhead", "2 vs transformers.Trainer", "3 packing", "4 preprocessing", "5 checkpoint",
         "6 ZeRO-1 memory", "6 ZeRO-2 memory", "6 ZeRO-3 memory"]


def test_bench_quick_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # Its own process: the bench starts a process group and a DeepSpeed engine in the process it runs in.
    result = subprocess.run([sys.executable, "-m", "sft_dist", "bench", "--quick", "--out", str(out)], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    results = {r["name"]: r for r in payload["results"]}
    assert list(results) == NAMES
    assert all(r["value"] > 0 and r["baseline"] > 0 for r in results.values())
    assert [round(results[f"6 ZeRO-{s} memory"]["ratio"], 3) for s in (1, 2, 3)] == [0.75, 0.625, 0.5]  # fp32
    assert payload["settings"]["model"] == str(REPO / "configs" / "models" / "tiny-llama")
    # Same model, same batches, same optimizer settings: sft_dist's steps and the plain loop's agree.
    assert float(results["1 framework overhead"]["note"].split("gap ")[1]) < 1e-4
    for name in NAMES:
        assert name in result.stdout
