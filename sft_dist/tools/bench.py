"""`sft-dist bench`: side-by-side measurements, each a ratio to a baseline run in the same invocation,
printed as a table and written as JSON.

1. overhead: sft_dist's training step (1 worker, ZeRO-0, in this process, no Ray) over a plain PyTorch
   loop (same model, same batches, AdamW, clipping, scheduler); steps interleaved so noise hits both.
2. alternative: sft_dist's tokens/s over TRL's SFTTrainer (`transformers.Trainer` when TRL is not
   installed) on the same model, conversations, batch and world size (1), without and with packing.
3. packing: the share of real tokens in padded batches, packed over unpacked.
4. preprocessing: sft_dist's tokenization with loss masks, rows/s, over SFTTrainer's own dataset
   preparation of the same conversations (sft_dist.tools.bench_baselines).
5. checkpoint: save and load MB/s; the share of training time spent saving at the checkpoint cadence.
6. ZeRO memory: per-rank parameter + gradient + optimizer bytes at 2 workers over 1, stages 1-3, read
   off real DeepSpeed engines in 1 and 2 CPU processes (sft_dist.tools.bench_zero); (6b, CPU) each
   stage's step time at 2 processes of 1 thread over one process of 2 threads, the same global batch.
8. loss (full runs only): the chunked causal-LM loss over the full logits, loss-path peak memory and
   step time at a 128k vocabulary and a long sequence, one process per measurement (bench_loss).
9. packed attention: tokens/s of packed rows with attention per example (sft_dist's, without
   flash-attention) over sdpa with the dense block-diagonal mask at L=1024, and at L=1024 over L=128
   (bench_attention).
10. speech: audio seconds per second of sft_dist's step on the tiny Whisper config over a plain loop
   written from Hugging Face's Whisper recipe (its processor as the collate, the model's loss, fused
   AdamW), the same clips (bench_speech).

Threads are pinned, every timed part is warmed up first, and times are medians over repeats with their
spread (the interquartile range over the median). CPU timings on a shared machine are noisy: compare
the ratios, not the absolute numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Result:
    name: str
    measured: str  # what the value is, with its unit
    value: float
    baseline_name: str
    baseline: float
    spread: float | None = None  # interquartile range / median of the measured value
    target: str = ""
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")


def median_spread(samples: list[float]) -> tuple[float, float]:
    q25, q50, q75 = np.percentile(samples, [25, 50, 75])
    return float(q50), float((q75 - q25) / q50) if q50 else 0.0


def bench_config(config: str | None, quick: bool, out_dir: Path, *overrides: str) -> Any:
    from sft_dist import config as config_lib

    path = config or str(REPO / "configs" / ("tiny-cpu.yaml" if quick else "quickstart.yaml"))
    # The shipped configs name their files relative to the repository; a given config, to the cwd.
    with contextlib.chdir(REPO if config is None else os.getcwd()):
        return config_lib.load(path, [f"output_dir={out_dir}", "run_name=bench", "ray.num_workers=1",
                                      "deepspeed.stage=0", "eval.generate=null", "checkpoint.every_steps=null",
                                      "train.max_steps=1000", *overrides])


# ---------------------------------------------------------------- 1, 2, 5: steps and checkpoints


def plain_step(model: Any, optimizer: Any, scheduler: Any, rows: list[dict], pad_id: int, global_tokens: int,
               max_grad_norm: float | None) -> float:
    """The baseline: one AdamW step of a plain PyTorch loop with sft_dist's token-weighted loss."""
    import torch

    from sft_dist.data.batches import attention_of, collate, model_inputs
    from sft_dist.modeling.loss import token_loss_sums

    for micro in rows:
        batch = {k: v.to(model.device) for k, v in collate(micro, pad_id, attention_of(model)).items()}
        loss_sum, _, _ = token_loss_sums(model(**model_inputs(batch)).logits, batch["labels"])
        (loss_sum / global_tokens).backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / global_tokens


def overhead_and_checkpoint(ctx: Any, cfg: Any, data: Any, warmup: int, repeats: int, cadence: int
                            ) -> tuple[list[Result], float]:
    """Measurements 1 and 5 on one in-process session (ZeRO-0, 1 worker), and sft_dist's tokens/s."""
    import torch
    from transformers import get_scheduler

    from sft_dist.modeling import model as model_lib
    from sft_dist.worker import checkpoint, train
    from sft_dist.worker import engine as engine_lib
    from sft_dist.worker import session as session_lib

    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    session, _ = session_lib.set_up(ctx, cfg, data, None)
    plan, t = session.plan, cfg.train
    supervised = np.asarray(session.train_set["num_supervised"])
    pad_id = session.tokenizer.pad_token_id
    model = model_lib.build(cfg.model, torch.float32).to(ctx.device)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in engine_lib.parameter_groups(model, t)]
    # Fused: the best AdamW a user would write (torch fuses it on CPU and CUDA alike), not the for-loop default.
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps, fused=True)
    steps = warmup + repeats
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * 1000),
                              num_training_steps=1000)
    ours, plain, tokens, losses = [], [], [], []
    for step in range(steps):
        started = time.perf_counter()
        loss_sum, step_tokens, global_supervised = train.train_step(session.engine, ctx, session.train_set, plan,
                                                                    step, supervised, session.batches)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        micro = [session.train_set[[int(i) for i in m]] for m in plan.micro_batches(step, 0)]
        plain_loss = plain_step(model, optimizer, scheduler, micro, pad_id, global_supervised, t.max_grad_norm)
        plain.append(time.perf_counter() - started)
        tokens.append(step_tokens)
        losses.append((loss_sum / global_supervised, plain_loss))
    ours_s, ours_spread = median_spread(ours[warmup:])
    plain_s, _ = median_spread(plain[warmup:])
    loss_gap = max(abs(a - b) for a, b in losses)
    results = [Result("1 framework overhead", "step time s (median)", ours_s, "plain PyTorch loop, fused AdamW",
                      plain_s, ours_spread, "<= 1.05x", f"same batches; largest train-loss gap {loss_gap:.2e}")]
    tokens_per_s = float(np.sum(tokens[warmup:]) / np.sum(ours[warmup:]))
    return results + [checkpoint_result(session, ctx, checkpoint, ours_s, cadence, max(2, repeats // 5))], tokens_per_s


def checkpoint_result(session: Any, ctx: Any, checkpoint: Any, step_s: float, cadence: int, repeats: int) -> Result:
    """Save (the run's own sharded save, registered in the run folder) and load, timed; MB/s of both."""
    from sft_dist import checkpoints
    from sft_dist.records import LoopState

    saves, loads, size_mb = [], [], 0.0
    for i in range(repeats + 1):  # the first of each is a warm-up
        state = LoopState(step=10_000 + i)
        started = time.perf_counter()
        checkpoint.save(session.engine, ctx, state, {"step": state.step})
        saves.append(time.perf_counter() - started)
        folder = ctx.storage.local_path() / checkpoints.folder_name(state.step)
        size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
        started = time.perf_counter()
        checkpoint.load(session.engine, ctx, folder)
        loads.append(time.perf_counter() - started)
    save_s, save_spread = median_spread(saves[1:])
    load_s, _ = median_spread(loads[1:])
    share = save_s / (cadence * step_s + save_s)
    return Result("5 checkpoint", "save MB/s (median)", size_mb / save_s, "load MB/s", size_mb / load_s, save_spread,
                  note=f"{size_mb:.1f} MB; saving every {cadence} steps takes {share:.1%} of training time")


# ---------------------------------------------------------------- 2: against the Hugging Face stack


def session_tokens_per_s(ctx: Any, cfg: Any, data: Any, warmup: int, repeats: int) -> float:
    """sft_dist's training tokens/s on `data` (e.g. packed rows), a fresh session as in measurement 1."""
    from sft_dist.worker import session as session_lib
    from sft_dist.worker import train

    session, _ = session_lib.set_up(ctx, cfg, data, None)
    supervised = np.asarray(session.train_set["num_supervised"])
    times, tokens = [], []
    for step in range(warmup + repeats):
        started = time.perf_counter()
        _, step_tokens, _ = train.train_step(session.engine, ctx, session.train_set, session.plan, step, supervised,
                                             session.batches)
        times.append(time.perf_counter() - started)
        tokens.append(step_tokens)
    return float(np.sum(tokens[warmup:]) / np.sum(times[warmup:]))


def alternative_results(ours: dict[bool, float], theirs: dict[bool, tuple[float, float]], baseline: str
                        ) -> list[Result]:
    """tokens/s ratios keyed by packing: unpacked, packed, and the gain packing brings to each side."""
    return [
        Result("2a vs HF, unpacked", "tokens/s, sft_dist", ours[False], baseline, theirs[False][0], None, ">= 1.0x",
               f"{baseline} spread {theirs[False][1]:.0%}"),
        Result("2b vs HF, packed", "tokens/s, sft_dist packed", ours[True], f"{baseline} packed", theirs[True][0],
               None, note=f"{baseline} spread {theirs[True][1]:.0%}"),
        Result("2c packing gain", "tokens/s, sft_dist packed", ours[True], "sft_dist unpacked", ours[False],
               note=f"{baseline}'s own gain {theirs[True][0] / theirs[False][0]:.2f}x"),
    ]


def mfu_result(cfg: Any, ours: dict[bool, float], theirs: dict[bool, tuple[float, float]], baseline: str,
               peak: float) -> Result:
    """GPU only: model FLOP/s utilization (6·N·tokens/s over the device's peak) of both sides' tokens/s."""
    from sft_dist.tools import mfu, plan

    n = plan.model_shape(cfg.model.name_or_path).total_params
    return Result("7 MFU", "MFU, sft_dist", mfu.mfu(n, ours[False], peak), baseline, mfu.mfu(n, theirs[False][0], peak),
                  note=f"peak {peak:g} TFLOP/s; packed: sft_dist {mfu.mfu(n, ours[True], peak):.1%}, "
                       f"{baseline} {mfu.mfu(n, theirs[True][0], peak):.1%}")


# ---------------------------------------------------------------- 3, 4: data


def packing_result(plain_data: Any, packed_data: Any) -> Result:
    plain = plain_data.stats["train"]["batching"]["token_efficiency"]
    packed = packed_data.stats["train"]["batching"]["token_efficiency"]
    return Result("3 packing", "real tokens / batch tokens, packed", packed, "unpacked", plain,
                  note=f"{packed_data.stats['train']['examples_per_row']} examples per packed row")


def preprocessing_result(cfg: Any, trl_trainer: Any, repeats: int) -> Result:
    """Rows/s of sft_dist's encoding map (chat template, loss masks from the template's spans), as
    `data.prepare` runs it, over SFTTrainer's own dataset preparation of the same conversations."""
    import datasets

    from sft_dist.data.encode import FEATURES, Encoder
    from sft_dist.data.templates import chat_template
    from sft_dist.modeling import model as model_lib
    from sft_dist.tools import bench_baselines as hf

    tokenizer = model_lib.load_tokenizer(cfg.model)
    encoder = Encoder(cfg.data, tokenizer, chat_template(tokenizer, cfg.data.chat_template))
    rows = datasets.Dataset.from_dict({"messages": hf.conversations(cfg)})

    def ours() -> Any:
        return rows.map(encoder, batched=True, with_indices=True, remove_columns=rows.column_names, features=FEATURES)

    if trl_trainer is not None:
        (theirs, count), baseline = hf.trl_preparation(trl_trainer, cfg), "SFTTrainer's dataset preparation"
    else:
        (theirs, count), baseline = hf.chat_template_per_row(cfg), "apply_chat_template per row (TRL not installed)"
    ours_s, spread = timed(ours, repeats)
    theirs_s, _ = timed(theirs, repeats)
    note = f"{count} rows"
    if trl_trainer is not None:  # the same tokens on both sides, or the comparison is not like for like
        same = sum(a == b for a, b in zip(ours()["input_ids"], theirs()["input_ids"]))
        note += f"; identical input ids on {same}/{count} rows"
    return Result("4 preprocessing", "rows/s, sft_dist with loss masks", count / ours_s, baseline, count / theirs_s,
                  spread, note=note)


def timed(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return median_spread(samples)


# ---------------------------------------------------------------- 6: ZeRO memory


# What each stage partitions. The gradients are measured at the step: ZeRO-1 holds them whole during
# backward and keeps only its partition once they are reduced.
PARTITIONED = {1: "optimizer states (gradients once reduced)", 2: "optimizer states and gradients",
               3: "everything"}


def zero_scaling_results(ctx: Any, config: str | None, quick: bool, out_dir: Path) -> list[Result]:
    """Per-rank bytes measured on DeepSpeed engines at 2 processes over 1 (this one, `ctx`), stage by stage,
    with each part's ratio."""
    from sft_dist.tools import bench_zero

    one, two = bench_zero.measure_here(ctx, config, quick, out_dir), bench_zero.measure(config, quick, 2, out_dir)
    out = []
    for stage in bench_zero.STAGES:
        parts = ", ".join(f"{part.replace('_', ' ')} {two[stage][part] / one[stage][part]:.2f}" for part in one[stage])
        out.append(Result(f"6 ZeRO-{stage} memory", "per-rank states bytes, 2 workers", sum(two[stage].values()),
                          "1 worker", sum(one[stage].values()), target="0.5 x part",
                          note=f"measured on the engines: {parts}; DeepSpeed partitions {PARTITIONED[stage]}"))
    return out


def zero_speed_results(config: str | None, quick: bool, out_dir: Path) -> list[Result]:
    """Step time of each ZeRO stage at 2 processes of 1 thread over one process of 2 threads (ZeRO-0), the
    same global batch: what sharding costs where the model would fit unsharded (`sft-dist plan` quotes it)."""
    from sft_dist.tools import bench_zero

    one, two = bench_zero.step_times(config, quick, out_dir)
    out = []
    for stage in bench_zero.SPEED_STAGES:
        ratios = [b / a for a, b in zip(one, two[stage])]
        out.append(Result(f"6b ZeRO-{stage} step", "step s, 2 processes x 1 thread", float(np.median(two[stage])),
                          "1 process x 2 threads, ZeRO-0", float(np.median(one)),
                          median_spread(ratios)[1] if len(ratios) > 1 else None,
                          note=f"same global batch; {len(ratios)} interleaved pair(s)"))
    return out


def loss_results(use_gpu: bool) -> list[Result]:
    """The chunked causal-LM loss over the full logits: loss-path peak memory and step time (bench_loss)."""
    from sft_dist.tools import bench_loss

    measured, size = bench_loss.measure(quick=False, use_gpu=use_gpu), bench_loss.sizes(quick=False)
    memory = "peak GPU bytes allocated" if use_gpu else "peak RSS bytes"
    note = (f"tiny-width Llama, vocab {bench_loss.VOCAB}, {size['seq']} tokens, chunks of {size['chunk']}; "
            f"{len(measured['full'])} processes each, interleaved")
    out = []
    for key, name, what, target in (("peak_bytes", "8a loss memory", f"{memory} of the loss path", "<= 0.125x"),
                                    ("step_s", "8b loss step time", "s per forward+backward", "<= 1.05x")):
        ours, ours_spread = median_spread([m[key] for m in measured["chunked"]])
        theirs, _ = median_spread([m[key] for m in measured["full"]])
        out.append(Result(name, f"{what}, chunked loss", ours, "full logits", theirs, ours_spread, target, note))
    return out


def attention_results(quick: bool) -> list[Result]:
    """Packed attention per example against the dense mask at L=1024, and its cost at L=1024 over L=128
    (bench_attention)."""
    from sft_dist.tools import bench_attention

    measured = bench_attention.measure(quick)
    ours, ours_spread = median_spread(measured[(1024, "per_example")])
    dense, _ = median_spread(measured[(1024, "dense")])
    short, _ = median_spread(measured[(128, "per_example")])
    dense_short, _ = median_spread(measured[(128, "dense")])
    note = (f"packed rows of 20-110-token examples, forward+backward, a 2-layer Llama; the dense mask's own "
            f"L=1024 over L=128: {dense / dense_short:.2f}x")
    return [Result("9a packed attention", "tokens/s at L=1024, per example", ours, "sdpa, dense mask", dense,
                   ours_spread, ">= 1x", note),
            Result("9b packed row length", "tokens/s at L=1024, per example", ours, "L=128", short, ours_spread,
                   ">= 0.8x", "attention cost per token across row lengths")]


# ---------------------------------------------------------------- the command


def run(config: str | None, quick: bool, out_dir: Path, use_gpu: bool = False, peak_tflops: float | None = None
        ) -> tuple[list[Result], dict[str, Any]]:
    import datasets
    import torch

    from sft_dist.driver import commands
    from sft_dist.tools import bench_baselines as hf
    from sft_dist.tools import mfu
    from sft_dist.worker import runtime

    threads = 1
    os.environ["OMP_NUM_THREADS"] = str(threads)  # else accelerate (under the Trainer) picks its own count
    torch.set_num_threads(threads)
    datasets.disable_progress_bars()  # the baselines' dataset maps would each draw one
    warmup, repeats = (3, 30) if quick else (3, 15)
    device = f"ray.use_gpu={str(use_gpu).lower()}"
    cfg = bench_config(config, quick, out_dir, f"ray.threads_per_worker={threads}", device)
    if cfg.model.task != "causal_lm":  # its baselines (TRL, the plain loop) are causal LMs' loops
        from sft_dist.errors import UserError

        raise UserError(f"sft-dist bench --config: measures causal-LM configs, {config} is {cfg.model.task} (its "
                        "runs log their own throughput; line 10 measures speech recognition)", key="model.task")
    peak = mfu.peak_tflops(torch.cuda.get_device_name(), cfg.train.precision, peak_tflops) if use_gpu else None
    plain_data = commands.prepare_data(cfg)
    packed_cfg = bench_config(config, quick, out_dir, f"ray.threads_per_worker={threads}", device,
                              "data.packing=true")
    packed_data = commands.prepare_data(packed_cfg)
    cadence = cfg.checkpoint.every_steps or 100
    # The baselines first: once this process holds sft_dist's process group, they would wrap the model in DDP.
    theirs, trl_trainer = {}, None
    for packing, data in ((False, plain_data), (True, packed_data)):
        if hf.trl_installed():
            *theirs[packing], trainer = hf.trl_tokens_per_s(cfg, packing, warmup, repeats, out_dir)
            trl_trainer = trl_trainer or trainer
        else:
            theirs[packing] = hf.trainer_tokens_per_s(cfg, data, warmup, repeats, out_dir)
        torch.set_num_threads(threads)  # the Trainer's accelerate sets its own
    baseline = "TRL SFTTrainer" if trl_trainer is not None else "transformers.Trainer (TRL not installed)"
    ctx = runtime.local_context(use_gpu, threads, lambda event: None, cfg.run_dir(), threading.Event())
    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    results, ours_tps = overhead_and_checkpoint(ctx, cfg, plain_data, warmup, repeats, cadence)
    ours = {False: ours_tps, True: session_tokens_per_s(ctx, packed_cfg, packed_data, warmup, repeats)}
    results += alternative_results(ours, theirs, baseline)
    if peak is not None:
        results.append(mfu_result(cfg, ours, theirs, baseline, peak))
    results.append(packing_result(plain_data, packed_data))
    results.append(preprocessing_result(cfg, trl_trainer, repeats=3 if quick else 5))
    results += zero_scaling_results(ctx, config, quick, out_dir)
    if not use_gpu:  # on GPUs the alternative to sharding is not threads
        results += zero_speed_results(config, quick, out_dir)
    results += attention_results(quick)
    from sft_dist.tools import bench_speech

    results.append(bench_speech.speech_result(ctx, out_dir, quick))
    if not quick:  # minutes of CPU: a 128k vocabulary over thousands of tokens, twice per repeat
        results += loss_results(use_gpu)
    settings = {"model": cfg.model.name_or_path, "threads": threads, "warmup_steps": warmup, "timed_steps": repeats,
                "micro_batch_size": cfg.train.micro_batch_size, "max_seq_len": cfg.data.max_seq_len,
                "precision": cfg.train.precision, "checkpoint_cadence_steps": cadence, "quick": quick,
                "baseline": baseline, "device": torch.cuda.get_device_name() if use_gpu else "cpu",
                "peak_tflops": peak, "torch": torch.__version__}
    return sorted(results, key=lambda r: (int(r.name.split()[0].rstrip('abc')), r.name)), settings  # 9b before 10


def table(results: list[Result]) -> str:
    lines = [f"{'measurement':<26}{'value':>12}{'baseline':>12}{'ratio':>8}{'spread':>8}  {'target':<10}  what"]
    for r in results:
        spread = f"{r.spread:.0%}" if r.spread is not None else ""
        lines.append(f"{r.name:<26}{r.value:>12.4g}{r.baseline:>12.4g}{r.ratio:>7.3f}x{spread:>8}  {r.target:<10}  "
                     f"{r.measured} / {r.baseline_name}" + (f"; {r.note}" if r.note else ""))
    return "\n".join(lines)


def main(config: str | None, quick: bool, out: str, device: str = "auto", peak_tflops: float | None = None) -> int:
    """`device`: "cpu" (CUDA is never touched), "gpu", or "auto" (the GPU when CUDA has one)."""
    if device == "auto":
        import torch

        device = "gpu" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="sft_dist_bench_") as tmp:
        results, settings = run(config, quick, Path(tmp), device == "gpu", peak_tflops)
    print(table(results), flush=True)
    payload = {"settings": settings,
               "results": [{**dataclasses.asdict(r), "ratio": r.ratio} for r in results]}
    Path(out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0
