"""Measurement 10 of `sft-dist bench`: speech recognition throughput, in audio seconds trained per second.

sft_dist's in-process step (1 worker, ZeRO-0, as measurement 1) on `configs/speech-tiny.yaml` (a tiny
Whisper, espeak-ng clips) against the plain loop a user writes from Hugging Face's Whisper fine-tuning
recipe: the model's own processor as the collate (feature extractor over the decoded clips, tokenizer
over the transcripts, padding as -100, the leading start token dropped because the model adds it), the
model's own loss (`labels=`), fused AdamW with the same settings and clipping. The same clips in the same
order; the two steps alternate, so machine noise hits both. Both decode the clips' bytes inside the step.
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any

import numpy as np

from sft_dist.tools.bench import REPO, Result, median_spread

SPEECH_CONFIG = REPO / "configs" / "speech-tiny.yaml"


def speech_config(out_dir: Any, *overrides: str) -> Any:
    from sft_dist import config as config_lib

    with contextlib.chdir(REPO):  # the shipped config names its files relative to the repository
        return config_lib.load(str(SPEECH_CONFIG), [f"output_dir={out_dir}", "run_name=bench-speech",
                                                    "ray.num_workers=1", "deepspeed.stage=0",
                                                    "checkpoint.every_steps=null", "train.max_steps=1000",
                                                    *overrides])


class PlainWhisperLoop:
    """The baseline's step: what the Hugging Face recipe's collator and a hand-written loop do."""

    def __init__(self, cfg: Any, device: Any):
        import torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        t = cfg.train
        self.processor = AutoProcessor.from_pretrained(cfg.model.name_or_path)
        self.model = AutoModelForSpeechSeq2Seq.from_pretrained(cfg.model.name_or_path).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                                           weight_decay=t.weight_decay, fused=True)
        self.max_grad_norm, self.device = t.max_grad_norm, device

    def step(self, clips: list[bytes], texts: list[str]) -> float:
        import soundfile
        import torch

        extractor, tokenizer = self.processor.feature_extractor, self.processor.tokenizer
        arrays = [soundfile.read(io.BytesIO(data), dtype="float32")[0] for data in clips]
        features = extractor(arrays, sampling_rate=extractor.sampling_rate, return_tensors="pt").input_features
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        labels = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        if (labels[:, 0] == self.model.config.decoder_start_token_id).all():
            labels = labels[:, 1:]  # the model prepends the decoder's start token itself
        loss = self.model(input_features=features.to(self.device), labels=labels.to(self.device)).loss
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def measure(ctx: Any, out_dir: Any, quick: bool) -> dict[str, list[float]]:
    """{"ours", "plain": audio seconds per second of each timed step}."""
    from sft_dist.driver import commands
    from sft_dist.tasks import task_of
    from sft_dist.worker import session as session_lib
    from sft_dist.worker import train

    cfg = speech_config(out_dir)
    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    session, _ = session_lib.set_up(ctx, cfg, commands.prepare_data(cfg), None)
    plan, task = session.plan, task_of(cfg)
    supervised = np.asarray(session.train_set["num_supervised"])
    durations = np.asarray(session.train_set["duration_s"])
    plain = PlainWhisperLoop(cfg, ctx.device)
    tokenizer = plain.processor.tokenizer
    warmup, repeats = (2, 6) if quick else (3, 15)
    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    for step in range(warmup + repeats):
        rows = session.train_set[[int(i) for m in plan.micro_batches(step, 0) for i in m]]
        texts = tokenizer.batch_decode(rows["input_ids"], skip_special_tokens=True)  # the data's transcripts
        audio_s = float(durations[plan.global_batch(step)].sum())
        started = time.perf_counter()
        train.train_step(session.engine, ctx, session.train_set, plan, step, supervised, session.batches,
                         task.loss(cfg.train), model_loss=task.model_loss)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        plain.step(rows["audio"], texts)
        plain_s = time.perf_counter() - started
        if step >= warmup:
            rates["ours"].append(audio_s / ours_s)
            rates["plain"].append(audio_s / plain_s)
    return rates


def speech_result(ctx: Any, out_dir: Any, quick: bool) -> Result:
    rates = measure(ctx, out_dir, quick)
    ours, spread = median_spread(rates["ours"])
    plain, _ = median_spread(rates["plain"])
    return Result("10 speech throughput", "audio s/s (median)", ours, "plain loop, HF recipe, fused AdamW", plain,
                  spread, ">= 0.95x", "configs/speech-tiny.yaml: a tiny Whisper, 8 clips a step, 1 worker, ZeRO-0")
