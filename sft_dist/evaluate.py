"""Coordinated validation: every rank evaluates a disjoint shard, totals are all-reduced, and every rank
gets the same metrics. Also greedy generation on held-out prompts, in lockstep on all ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sft_dist.data.batches import attention_of, collate, eval_batches, model_inputs
from sft_dist.loss import token_loss_sums
from sft_dist.runtime import RunContext, all_reduce_sum


def validate(engine: Any, ctx: RunContext, eval_set: Any, micro_batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-weighted eval loss, perplexity and token accuracy over the whole eval set.

    Collective: every rank calls it at the same step (each forward under ZeRO-3 gathers parameters).
    """
    module = engine.module
    was_training = module.training
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, supervised tokens, correct tokens
    with torch.no_grad():
        for indices in eval_batches(len(eval_set), micro_batch_size, ctx.rank, ctx.world_size):
            # A rank whose share ran out still runs a forward (on example 0), counted with weight 0.
            rows = eval_set[[int(i) for i in indices] or [0]]
            batch = {k: v.to(ctx.device) for k, v in collate(rows, pad_id, attention_of(engine.module)).items()}
            logits = engine(**model_inputs(batch)).logits
            if len(indices):
                totals += torch.stack([s.double().cpu() for s in token_loss_sums(logits, batch["labels"])])
    module.train(was_training)
    loss_sum, tokens, correct = all_reduce_sum(totals).tolist()
    loss = loss_sum / tokens
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_token_acc": correct / tokens,
            "eval_tokens": int(tokens)}


def generate_answers(
    engine: Any, ctx: RunContext, tokenizer: Any, prompts: list[dict], max_new_tokens: int, zero3: bool
) -> list[dict[str, Any]]:
    """Greedy answers to held-out prompts, with exact match against the expected answer.

    Every rank generates every prompt: under ZeRO-3 each decoding step is a collective, and
    `synced_gpus` keeps ranks stepping together until all have finished.
    """
    module = engine.module
    was_training = module.training
    module.eval()
    samples = []
    with torch.no_grad():
        for prompt in prompts:
            inputs = tokenizer.apply_chat_template(
                prompt["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(ctx.device)
            output = module.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                synced_gpus=zero3 and ctx.world_size > 1,
            )
            answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            samples.append({"prompt": prompt["messages"][-1]["content"], "expected": prompt["expected"],
                            "answer": answer, "exact_match": answer == prompt["expected"].strip()})
    module.train(was_training)
    return samples
