"""Build the tiny random-weight models the tests train: one per model family users fine-tune, each with its
own tokenizer, special tokens and chat template, shipped under configs/models/tiny-FAMILY/.

    python launch/make_demo_data.py              # the tokenizers are trained on its train split
    python launch/make_tiny_model.py [--family NAME ...] [--out-root DIR]

| family   | mirrors                    | what the code under test must get right                                  |
| -------- | -------------------------- | ------------------------------------------------------------------------ |
| llama    | SmolLM2-135M-Instruct      | untied head; ChatML with a default system prompt; special ids 0/1/2       |
| qwen2    | Qwen2.5-Instruct (0.5-3B)  | tied head; attention bias; no BOS token; special tokens after the vocab; |
|          |                            | embedding rows beyond the tokenizer; rope_theta 1e6; two end ids         |
| gemma    | Gemma-2B-it                | tied head; a template that refuses a system turn; BOS added by the       |
|          |                            | tokenizer and the template; the assistant is "model"; head_dim != h/heads |
| mistral  | Mistral-7B-Instruct-v0.3   | untied head; [INST] template without a generation prompt; the answer ends |
|          |                            | with EOS itself; no pad token; rope_theta 1e6                            |

Each is ~50-150k parameters (2 layers, hidden 64), so a training step takes milliseconds, small enough to ship
(about 0.5 MB a folder). The non-default rope_theta values and a larger initializer range than the real
models' make the logits depend on positions and RoPE settings, so a client that reads them wrongly is
caught by a logits comparison. Deterministic: rerunning gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = REPO_ROOT / "configs" / "models"
TRAIN_DATA = REPO_ROOT / "configs" / "data" / "dates" / "train.jsonl"

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# SmolLM2-135M-Instruct's template verbatim: default system turn, "<|im_end|>\n" after each turn.
SMOLLM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-Instruct's, without its tool-calling branches: the default system turn is rendered even before
# an empty conversation.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Gemma-2B-it's verbatim: no system role, strict alternation, the assistant is called "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Mistral-7B-Instruct's (v0.1-v0.3 shape): no system role, no generation prompt, the answer ends with EOS.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    """One model family's tiny stand-in: its tokenizer's special tokens and template, its model config."""

    config_class: type[PretrainedConfig]
    config: dict[str, Any]
    template: str
    leading_specials: list[str]  # trained first: ids 0, 1, ... (SmolLM2, Gemma, Mistral)
    tokens: dict[str, str | None]  # bos/eos/pad/unk token text
    trailing_specials: list[str] = field(default_factory=list)  # added after the vocabulary (Qwen)
    corpus_extra: list[str] = field(default_factory=list)  # what the template puts around the content
    end_tokens: list[str] = field(default_factory=list)  # generation stops at any of these (default: eos)
    bos_post_processor: bool = False  # the tokenizer itself prepends BOS (Gemma), as plain `tok(text)` shows
    vocab_multiple: int = 1  # the embedding has rows past the tokenizer, rounded up to this (Qwen)


FAMILIES = {
    "llama": Family(
        LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False), SMOLLM_TEMPLATE,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        corpus_extra=[SMOLLM_SYSTEM, "system\n", "user\n", "assistant\n"]),
    "qwen2": Family(
        Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2,
                          rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        QWEN_TEMPLATE, [], {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        trailing_specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        corpus_extra=[QWEN_SYSTEM, "system\n", "user\n", "assistant\n"], end_tokens=["<|im_end|>", "<|endoftext|>"],
        vocab_multiple=64),
    "gemma": Family(
        GemmaConfig, dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, initializer_range=0.2,
                          hidden_activation="gelu_pytorch_tanh"),
        GEMMA_TEMPLATE, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        corpus_extra=["user\n", "model\n"], end_tokens=["<eos>", "<end_of_turn>"], bos_post_processor=True),
    "mistral": Family(
        MistralConfig, dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, initializer_range=0.2,
                            sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        MISTRAL_TEMPLATE, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": "<unk>"},
        corpus_extra=[" ", " "]),
}


def corpus(family: Family) -> list[str]:
    """Everything the chat template will put in front of the tokenizer, minus special tokens."""
    texts = list(family.corpus_extra)
    with TRAIN_DATA.open() as f:
        for line in f:
            texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def build_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digits one per token (as in SmolLM2, Qwen2 and Gemma), then GPT-2 style byte-level splitting.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=family.leading_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus(family), trainer=trainer)
    tok.add_special_tokens(family.trailing_specials)
    bos = family.tokens["bos_token"]
    if family.bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    named = {k: v for k, v in family.tokens.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=family.template, model_max_length=512, **named)


def build_model(family: Family, tok: PreTrainedTokenizerFast) -> torch.nn.Module:
    vocab = -(-len(tok) // family.vocab_multiple) * family.vocab_multiple
    config = family.config_class(vocab_size=vocab, **SHAPE, **family.config, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)  # the only source of randomness in the weights
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    ends = [tok.convert_tokens_to_ids(t) for t in family.end_tokens] or tok.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=ends,
                                               pad_token_id=tok.pad_token_id)
    return model


def write(name: str, out: Path) -> None:
    family = FAMILIES[name]
    tok = build_tokenizer(family)
    model = build_model(family, tok)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)  # safetensors >= 0.8 writes owner-only files (safetensors#782)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: vocab {len(tok)}, {n_params} parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: all")
    parser.add_argument("--out-root", type=Path, default=MODELS)
    args = parser.parse_args()
    for name in args.family or sorted(FAMILIES):
        write(name, args.out_root / f"tiny-{name}")


if __name__ == "__main__":
    main()
