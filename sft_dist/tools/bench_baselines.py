"""The Hugging Face baselines of `sft-dist bench`: TRL's `SFTTrainer` (training tokens/s without and with
packing, and its dataset preparation), or `transformers.Trainer` where TRL is not installed.

TRL gets the training file's conversations as conversational prompt/completion rows (the prompt turns,
then the last assistant turn): its masked path for templates without `{% generation %}` markers, so it
trains on the answers as sft_dist does. Both sides count real (non-padding) tokens.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None


def conversations(cfg: Any) -> list[list[dict]]:
    lines = Path(cfg.data.train_sources()[0].path).read_text().splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def prompt_completion(convs: list[list[dict]]) -> Any:
    import datasets

    last = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in convs]
    return datasets.Dataset.from_dict({"prompt": [c[:i] for c, i in zip(convs, last)],
                                       "completion": [c[i:] for c, i in zip(convs, last)]})


def _training_args(cfg: Any, max_steps: int, out_dir: Path, counted: str) -> dict[str, Any]:
    """What SFTConfig and TrainingArguments share: sft_dist's batch, optimizer and schedule, on CPU, quiet."""
    t = cfg.train
    return dict(
        output_dir=str(out_dir), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], adam_epsilon=t.adam_eps,
        max_steps=max_steps, max_grad_norm=t.max_grad_norm or 0.0, lr_scheduler_type=t.scheduler,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=not cfg.ray.use_gpu,
        dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed, include_num_input_tokens_seen=counted)


def _tokenizer(cfg: Any) -> Any:
    from sft_dist.data.templates import chat_template
    from sft_dist.modeling import model as model_lib

    tokenizer = model_lib.load_tokenizer(cfg.model)
    if cfg.data.chat_template:  # the template sft_dist renders with
        tokenizer.chat_template = chat_template(tokenizer, cfg.data.chat_template)
    return tokenizer


def _step_log(seen: Callable[[], int] | None = None) -> tuple[Any, list[tuple[float, int]]]:
    """A callback recording (time, tokens seen so far) at the end of every optimizer step; the tokens are
    the Trainer's count unless `seen` counts them."""
    from transformers import TrainerCallback

    log: list[tuple[float, int]] = []

    class StepLog(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            log.append((time.perf_counter(), seen() if seen else state.num_input_tokens_seen))

    return StepLog(), log


def throughput(log: list[tuple[float, int]], warmup: int) -> tuple[float, float]:
    """tokens/s over the steps after the warm-up, and the spread (IQR / median) of per-step tokens/s."""
    times, seen = np.asarray([t for t, _ in log]), np.asarray([n for _, n in log], dtype=float)
    dt, tokens = np.diff(times)[warmup:], np.diff(seen)[warmup:]
    q25, q50, q75 = np.percentile(tokens / dt, [25, 50, 75])
    return float(tokens.sum() / dt.sum()), float((q75 - q25) / q50)


def sft_trainer(cfg: Any, packing: bool, max_steps: int, out_dir: Path, callbacks: list = ()) -> Any:
    """TRL's SFTTrainer on sft_dist's model, rows, batch and optimizer settings (packing: TRL's default, BFD)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from sft_dist.modeling import model as model_lib

    # Packed batches are padding-free (one flattened row): every token is real.
    args = SFTConfig(**_training_args(cfg, max_steps, out_dir, "all" if packing else "non_padding"),
                     max_length=cfg.data.max_seq_len, packing=packing, dataset_num_proc=None)
    return SFTTrainer(model=model_lib.build(cfg.model, torch.float32), args=args,
                      train_dataset=prompt_completion(conversations(cfg)), processing_class=_tokenizer(cfg),
                      callbacks=list(callbacks))


def trl_tokens_per_s(cfg: Any, packing: bool, warmup: int, repeats: int, out_dir: Path) -> tuple[float, float, Any]:
    """SFTTrainer's training tokens/s and spread, and the trainer (for its dataset preparation)."""
    callback, log = _step_log()
    trainer = sft_trainer(cfg, packing, warmup + repeats + 1, out_dir / f"trl-{packing}", [callback])
    trainer.train()
    return *throughput(log, warmup), trainer


def trainer_tokens_per_s(cfg: Any, data: Any, warmup: int, repeats: int, out_dir: Path) -> tuple[float, float]:
    """Without TRL: `transformers.Trainer` (the loop SFTTrainer runs) on sft_dist's own rows and collator."""
    import datasets
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from sft_dist.data.batches import attention_of, collate
    from sft_dist.modeling import model as model_lib

    rows = datasets.load_from_disk(data.train_dir)
    rows = rows.select_columns([c for c in ("input_ids", "labels", "seq_lens") if c in rows.column_names])
    tokenizer, model = _tokenizer(cfg), model_lib.build(cfg.model, torch.float32)
    collated = [0]  # real tokens; the Trainer's own count would read packed rows' 4-D masks as tokens

    def collator(features: list[dict]) -> dict:
        collated[0] += sum(len(f["input_ids"]) for f in features)
        return collate({k: [f[k] for f in features] for k in features[0]}, tokenizer.pad_token_id,
                       attention_of(model))

    callback, log = _step_log(lambda: collated[0])
    args = TrainingArguments(**_training_args(cfg, warmup + repeats + 1, out_dir / "trainer", "no"),
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[callback],
                      processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # its closing metrics line is noise in the bench's output
    trainer.train()
    return throughput(log, warmup)


def trl_preparation(trainer: Any, cfg: Any) -> tuple[Callable[[], Any], int]:
    """A call running SFTTrainer's own dataset preparation (tokenization, completion masks, labels,
    truncation) over the training conversations, and the number of rows. `_prepare_dataset` is private,
    but it is the code SFTTrainer runs on its datasets: an imitation would measure something else."""
    convs = conversations(cfg)

    def prepare() -> Any:
        return trainer._prepare_dataset(prompt_completion(convs), trainer.processing_class, trainer.args,
                                        False, None, "train")

    return prepare, len(convs)


def chat_template_per_row(cfg: Any) -> tuple[Callable[[], Any], int]:
    """Without TRL: `apply_chat_template` per row (what SFTTrainer runs to tokenize conversations)."""
    tokenizer, convs = _tokenizer(cfg), conversations(cfg)

    def prepare() -> Any:
        return [tokenizer.apply_chat_template(c, tokenize=True) for c in convs]

    return prepare, len(convs)
