"""Measurement 8 of `sft-dist bench`: the causal LM's loss path with the full logits against the chunked
loss (`train.chunked_loss`), at a large vocabulary and a long sequence: peak memory and step time.

The model is a tiny-width Llama with a 128k vocabulary, built from a config (no download): its loss path
is then most of its memory, as at a real model's long sequences. Each measurement is a process of its own
(`python -m sft_dist.tools.bench_loss`), so its peak RSS (VmHWM; or, on a GPU, `torch.cuda.max_memory_allocated`)
is that variant's alone; the loss-path peak is the peak during the steps over the memory held before them
(model and inputs). On CPU the process first pins glibc's mmap threshold, so a freed tensor's pages go back
at once and the RSS peak is the live bytes' peak, as cuda's max_memory_allocated is: with glibc's own
threshold, which grows as large blocks are freed, freed logits stayed in the heap, and the peak varied by
a fifth between machines. Full and chunked processes alternate, so machine noise hits both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VOCAB = 128_256  # Llama 3's


def sizes(quick: bool) -> dict[str, int]:
    # 16 chunks per sequence (8 in the quick run, where the logits still dominate the chunked loss's
    # memory, as plan's test of its estimate needs): the chunked loss holds a sixteenth of them at a time.
    return {"seq": 2048, "chunk": 256, "steps": 2, "repeats": 2} if quick else \
        {"seq": 4096, "chunk": 256, "steps": 3, "repeats": 3}


def measure(quick: bool, use_gpu: bool, timeout_s: float = 900) -> dict[str, list[dict[str, float]]]:
    """{"full"|"chunked": [{"peak_bytes", "step_s"} per process]}, the processes interleaved."""
    out: dict[str, list[dict[str, float]]] = {"full": [], "chunked": []}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    for _ in range(sizes(quick)["repeats"]):
        for variant in out:
            args = [sys.executable, "-m", "sft_dist.tools.bench_loss", variant, "quick" if quick else "full",
                    "gpu" if use_gpu else "cpu"]
            done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode:
                raise RuntimeError(f"the {variant} loss process exited {done.returncode}: {done.stderr[-2000:]}")
            out[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def _model(device: str) -> Any:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(device)


def _return_freed_memory_at_once() -> None:
    """glibc: every block of 64 KiB or more is its own mapping, unmapped when freed (setting the threshold
    also stops glibc raising it). Elsewhere (no mallopt) the peak keeps the allocator's retention."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (malloc.h)


def _reset_peak(device: str) -> None:
    """Start the peak from what the process holds now (model and inputs built)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: VmHWM := the current RSS


def _peak_bytes(device: str) -> float:
    """The peak since _reset_peak. On CPU VmHWM, not getrusage's ru_maxrss: that one outlives exec, so a
    process started from a large one (a long pytest session, vfork + exec) reports its parent's peak."""
    import torch

    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024.0  # kB


def _current_bytes(device: str) -> float:
    import torch

    if device == "cuda":
        return float(torch.cuda.memory_allocated())
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_process(variant: str, quick: bool, use_gpu: bool) -> dict[str, float]:
    """Steps of forward + backward of one sequence by `variant`'s loss ("full", "chunked", or "decoder":
    the same steps without the loss over the head, their floor); the peak over what the process held
    before them, and the median step."""
    import torch

    from sft_dist.modeling.loss import chunked_loss_of, token_loss_sums

    size, device = sizes(quick), "cuda" if use_gpu else "cpu"
    if device == "cpu":
        _return_freed_memory_at_once()
    torch.set_num_threads(1)
    model = _model(device)
    ids = torch.randint(0, VOCAB, (1, size["seq"]), device=device)
    chunked = chunked_loss_of(model, True, size["chunk"]) if variant == "chunked" else None
    held, times = _current_bytes(device), []
    _reset_peak(device)
    for _ in range(size["steps"] + 1):  # the first one warms up
        start = time.perf_counter()
        if chunked:
            loss_sum = chunked(model, {"input_ids": ids}, ids)[0]
        elif variant == "decoder":  # the floor: no loss over the head, whose gradient is still made
            loss_sum = model.model(input_ids=ids).last_hidden_state.sum() + 0 * model.lm_head.weight.sum()
        else:
            loss_sum = token_loss_sums(model(input_ids=ids).logits, ids)[0]
        loss_sum.backward()
        model.zero_grad(set_to_none=False)
        if use_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": _peak_bytes(device) - held, "step_s": sorted(times[1:])[len(times[1:]) // 2]}


if __name__ == "__main__":
    print(json.dumps(one_process(sys.argv[1], sys.argv[2] == "quick", sys.argv[3] == "gpu")))
