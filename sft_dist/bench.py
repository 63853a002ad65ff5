"""`sft-dist bench`: side-by-side measurements, each a ratio to a baseline run in the same invocation,
printed as a table and written as JSON.

1. overhead: sft_dist's training step (1 worker, ZeRO-0, in this process, no Ray) over a plain PyTorch
   loop (same model, same batches, AdamW, clipping, scheduler); steps interleaved so noise hits both.
2. alternative: sft_dist's tokens/s over `transformers.Trainer` (the loop TRL's SFTTrainer runs) on the
   same model, rows, batch; and with packing.
3. packing: the share of real tokens in padded batches, packed over unpacked.
4. preprocessing: sft_dist's tokenization with loss masks, rows/s, over `apply_chat_template` per row
   (what TRL's SFTTrainer runs to tokenize conversations).
5. checkpoint: save and load MB/s; the share of training time spent saving at the checkpoint cadence.
6. ZeRO memory: per-rank parameter + gradient + optimizer bytes at 2 workers over 1, stages 1-3
   (DeepSpeed's bytes per parameter, sft_dist.plan; a test checks them against DeepSpeed's estimators).

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
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]


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
    from sft_dist.loss import token_loss_sums

    for micro in rows:
        batch = collate(micro, pad_id, attention_of(model))
        loss_sum, _, _ = token_loss_sums(model(**model_inputs(batch)).logits, batch["labels"])
        (loss_sum / global_tokens).backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / global_tokens


def overhead_and_checkpoint(cfg: Any, data: Any, warmup: int, repeats: int, cadence: int
                            ) -> tuple[list[Result], float]:
    """Measurements 1 and 5 on one in-process session (ZeRO-0, 1 worker), and sft_dist's tokens/s."""
    import torch
    from transformers import get_scheduler

    from sft_dist import checkpoint, runtime

    ctx = runtime.local_context(False, cfg.ray.threads_per_worker, lambda event: None, cfg.run_dir(),
                                threading.Event())
    from sft_dist import engine as engine_lib  # after local_context: DeepSpeed reads DS_ACCELERATOR on import
    from sft_dist import model as model_lib
    from sft_dist import train

    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    session, _ = train.set_up(ctx, cfg, data, None)
    plan, t = session.plan, cfg.train
    supervised = np.asarray(session.train_set["num_supervised"])
    pad_id = session.tokenizer.pad_token_id
    model = model_lib.build(cfg.model, torch.float32)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in engine_lib.parameter_groups(model, t)]
    optimizer = torch.optim.AdamW(groups, lr=t.lr,
                                  betas=t.adam_betas, eps=t.adam_eps)
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
    results = [Result("1 framework overhead", "step time s (median)", ours_s, "plain PyTorch AdamW loop", plain_s,
                      ours_spread, "<= 1.05x", f"same batches; largest train-loss gap {loss_gap:.2e}")]
    tokens_per_s = float(np.sum(tokens[warmup:]) / np.sum(ours[warmup:]))
    return results + [checkpoint_result(session, ctx, checkpoint, ours_s, cadence, max(2, repeats // 5))], tokens_per_s


def checkpoint_result(session: Any, ctx: Any, checkpoint: Any, step_s: float, cadence: int, repeats: int) -> Result:
    """Save (the run's own sharded save, registered in the run folder) and load, timed; MB/s of both."""
    saves, loads, size_mb = [], [], 0.0
    for i in range(repeats + 1):  # the first of each is a warm-up
        state = {"step": 10_000 + i, "examples_seen": 0}
        started = time.perf_counter()
        checkpoint.save(session.engine, ctx, state, {"step": state["step"]})
        saves.append(time.perf_counter() - started)
        folder = ctx.storage_dir / checkpoint.folder_name(state["step"])
        size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
        started = time.perf_counter()
        checkpoint.load(session.engine, ctx, folder)
        loads.append(time.perf_counter() - started)
    save_s, save_spread = median_spread(saves[1:])
    load_s, _ = median_spread(loads[1:])
    share = save_s / (cadence * step_s + save_s)
    return Result("5 checkpoint", "save MB/s (median)", size_mb / save_s, "load MB/s", size_mb / load_s, save_spread,
                  note=f"{size_mb:.1f} MB; saving every {cadence} steps takes {share:.1%} of training time")


# ---------------------------------------------------------------- 2: transformers.Trainer


def trainer_tokens_per_s(cfg: Any, data: Any, warmup: int, repeats: int, out_dir: Path) -> tuple[float, float]:
    """tokens/s of `transformers.Trainer` on the same rows, batch, learning rate (the loop SFTTrainer runs)."""
    import datasets
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from sft_dist import model as model_lib
    from sft_dist.data.batches import collate

    rows = datasets.load_from_disk(data.train_dir).select_columns(["input_ids", "labels"])
    tokenizer = model_lib.load_tokenizer(cfg.model)
    collated_tokens: list[int] = []

    def collator(features: list[dict]) -> dict:
        columns = {k: [f[k] for f in features] for k in ("input_ids", "labels")}
        collated_tokens.append(sum(len(ids) for ids in columns["input_ids"]))
        return collate(columns, tokenizer.pad_token_id)

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    t = cfg.train
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, max_steps=warmup + repeats + 1,
        max_grad_norm=t.max_grad_norm or 0.0, lr_scheduler_type=t.scheduler, logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, seed=cfg.seed)
    model = model_lib.build(cfg.model, torch.float32)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[StepTimes()])
    trainer.remove_callback(PrinterCallback)  # its closing metrics line is noise in the bench's output
    trainer.train()
    torch.set_num_threads(cfg.ray.threads_per_worker)
    times = np.diff(ends)[warmup:]
    # The step ending at ends[k] trained the batches collated for it (grad_accum per step).
    per_step = np.add.reduceat(np.asarray(collated_tokens[: len(ends) * t.grad_accum]),
                               np.arange(0, len(ends) * t.grad_accum, t.grad_accum))
    tokens = per_step[1:][warmup:]
    return float(tokens.sum() / times.sum()), median_spread(list(tokens / times))[1]


# ---------------------------------------------------------------- 3, 4: data


def packing_result(plain_data: Any, packed_data: Any) -> Result:
    plain = plain_data.stats["train"]["batching"]["token_efficiency"]
    packed = packed_data.stats["train"]["batching"]["token_efficiency"]
    return Result("3 packing", "real tokens / batch tokens, packed", packed, "unpacked", plain,
                  note=f"{packed_data.stats['train']['examples_per_row']} examples per packed row")


def preprocessing_result(cfg: Any, repeats: int) -> Result:
    """Rows/s of sft_dist's Encoder (chat template, loss masks from the template's spans) against
    apply_chat_template per row without masks, on the training file's rows."""
    from sft_dist import model as model_lib
    from sft_dist.data.encode import Encoder
    from sft_dist.data.templates import chat_template

    tokenizer = model_lib.load_tokenizer(cfg.model)
    template = chat_template(tokenizer, cfg.data.chat_template)
    lines = Path(cfg.data.train_sources()[0].path).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    batch = {"messages": [r["messages"] for r in rows]}
    encoder = Encoder(cfg.data, tokenizer, template)

    def ours() -> None:
        encoder(batch, list(range(len(rows))))

    def theirs() -> None:
        for r in rows:
            tokenizer.apply_chat_template(r["messages"], tokenize=True, chat_template=template)

    ours_s, spread = timed(ours, repeats)
    theirs_s, _ = timed(theirs, repeats)
    return Result("4 preprocessing", "rows/s, sft_dist with loss masks", len(rows) / ours_s,
                  "apply_chat_template per row (TRL's way)", len(rows) / theirs_s, spread,
                  note=f"{len(rows)} rows")


def timed(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return median_spread(samples)


# ---------------------------------------------------------------- 6: ZeRO memory


PARTITIONED = {1: "optimizer states", 2: "optimizer states and gradients", 3: "everything"}


def zero_scaling_results(cfg: Any) -> list[Result]:
    from sft_dist import plan

    shape = plan.model_shape(cfg.model.name_or_path)
    out = []
    for stage in (1, 2, 3):
        per_rank = {n: sum(v for k, v in plan.model_state_bytes(shape.total_params, shape.largest_layer_params,
                                                                plan.Setting(stage), cfg.train.precision, n).items()
                           if k != "gathered_layer") for n in (1, 2)}
        out.append(Result(f"6 ZeRO-{stage} memory", "per-rank states bytes, 2 workers", per_rank[2],
                          "1 worker", per_rank[1], target="0.5 x part",
                          note=f"{cfg.train.precision}, {shape.total_params:,} params; {PARTITIONED[stage]} "
                               "partitioned (their ratio 0.5), the rest replicated; DeepSpeed's bytes per param"))
    return out


# ---------------------------------------------------------------- the command


def run(config: str | None, quick: bool, out_dir: Path) -> tuple[list[Result], dict[str, Any]]:
    import torch

    from sft_dist import driver

    threads = 1
    os.environ["OMP_NUM_THREADS"] = str(threads)  # else accelerate (under the Trainer) picks its own count
    torch.set_num_threads(threads)
    warmup, repeats = (3, 30) if quick else (3, 15)
    cfg = bench_config(config, quick, out_dir, f"ray.threads_per_worker={threads}")
    plain_data = driver.prepare_data(cfg)
    packed_cfg = bench_config(config, quick, out_dir, f"ray.threads_per_worker={threads}", "data.packing=true")
    packed_data = driver.prepare_data(packed_cfg)
    cadence = cfg.checkpoint.every_steps or 100
    # The Trainer first: once this process holds sft_dist's process group, the Trainer would wrap the model in DDP.
    trainer_tps, trainer_spread = trainer_tokens_per_s(cfg, plain_data, warmup, repeats, out_dir)
    results, ours_tps = overhead_and_checkpoint(cfg, plain_data, warmup, repeats, cadence)
    results.append(Result("2 vs transformers.Trainer", "tokens/s, sft_dist", ours_tps,
                          "transformers.Trainer (SFTTrainer's loop)", trainer_tps, None, ">= 1.0x",
                          f"Trainer spread {trainer_spread:.0%}"))
    results.append(packing_result(plain_data, packed_data))
    results.append(preprocessing_result(cfg, repeats=3 if quick else 5))
    results += zero_scaling_results(cfg)
    settings = {"model": cfg.model.name_or_path, "threads": threads, "warmup_steps": warmup, "timed_steps": repeats,
                "micro_batch_size": cfg.train.micro_batch_size, "max_seq_len": cfg.data.max_seq_len,
                "precision": cfg.train.precision, "checkpoint_cadence_steps": cadence, "quick": quick,
                "torch": torch.__version__}
    return sorted(results, key=lambda r: r.name), settings


def table(results: list[Result]) -> str:
    lines = [f"{'measurement':<26}{'value':>12}{'baseline':>12}{'ratio':>8}{'spread':>8}  {'target':<10}  what"]
    for r in results:
        spread = f"{r.spread:.0%}" if r.spread is not None else ""
        lines.append(f"{r.name:<26}{r.value:>12.4g}{r.baseline:>12.4g}{r.ratio:>7.3f}x{spread:>8}  {r.target:<10}  "
                     f"{r.measured} / {r.baseline_name}" + (f"; {r.note}" if r.note else ""))
    return "\n".join(lines)


def main(config: str | None, quick: bool, out: str) -> int:
    with tempfile.TemporaryDirectory(prefix="sft_dist_bench_") as tmp:
        results, settings = run(config, quick, Path(tmp))
    print(table(results), flush=True)
    payload = {"settings": settings,
               "results": [{**dataclasses.asdict(r), "ratio": r.ratio} for r in results]}
    Path(out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0
