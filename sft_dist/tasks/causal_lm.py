"""Causal language modelling: chat, instruction, prompt/completion or plain text rows; next-token loss."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task


def text_encoder(data: Any, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    from sft_dist.data.encode import Encoder

    return Encoder(data, tokenizer, template)


def text_batches(cfg: Any, tokenizer: Any, module: Any) -> Any:
    from sft_dist.data.batches import TextBatches, attention_of

    return TextBatches(tokenizer.pad_token_id, attention_of(module))


def token_loss(train: Any) -> Any:
    from sft_dist.modeling.loss import token_loss_sums

    return lambda logits, labels: token_loss_sums(logits, labels, train.label_smoothing)


def token_counts(model: Any) -> Any:
    from sft_dist.tasks.heads import TokenCounts

    return TokenCounts()


TASK = Task(
    name="causal_lm", auto_class="AutoModelForCausalLM", peft_task_type="CAUSAL_LM", pipeline="text-generation",
    # messages: a row-level system prompt (ShareGPT) and tool schemas (OpenAI, LLaMA-Factory) beside the
    # turns; alpaca: history, the earlier [instruction, response] pairs.
    formats={"messages": ("messages", "role", "content", "system", "tools"),
             "alpaca": ("instruction", "input", "output", "system", "history"),
             "prompt_completion": ("prompt", "completion"), "text": ("text",)},
    # exact match / match come from eval.generate's answers (sft_dist.worker.evaluate), not from the counts.
    metrics={"eval_loss": "min", "eval_ppl": "min", "eval_token_acc": "max", "eval_exact_match": "max",
             "eval_match": "max"},
    encoder=text_encoder, batches=text_batches, loss=token_loss, counts=token_counts,
    generates=True, packs=True, labels_are_tokens=True, names_architecture=False,
)
