"""What an exported folder holds besides its weights, written so that every client reads it alike: the
transformers 5 this project runs and the transformers 4.4x-4.5x line that serving stacks (vLLM among them)
still pin. Also the end-of-turn token a chat template ends an answer with, the files' modes, and the lines
that tell the user how to load the folder. Imports neither Ray nor DeepSpeed.

transformers 5 renamed what it writes, and 4.x silently ignores the new names: `rope_parameters` (4.x reads
`rope_theta` and `rope_scaling`: SmolLM2 would run with rope_theta 10000 instead of 100000), `dtype` (4.x:
`torch_dtype`), and the tokenizer class `TokenizersBackend`, which 4.x refuses to load; its name there
for the same tokenizer.json-backed class is `PreTrainedTokenizerFast`. The folder carries both spellings;
transformers 5 reads its own and ignores (or maps back) the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# A marker answer: found again in the rendered sample conversation to see what the template puts after it.
_MARKER = "Zq9"


def write_config(config: Any, out: Path) -> None:
    """`config.save_pretrained(out)`, plus the 4.x spellings of the fields transformers 5 renamed."""
    config.save_pretrained(out)
    path = out / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, **older_client_fields(saved)}, indent=2, sort_keys=True) + "\n")


def older_client_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The fields transformers 4.x reads for what a transformers 5 config.json says in its own names."""
    fields: dict[str, Any] = {}
    if isinstance(config.get("dtype"), str):
        fields["torch_dtype"] = config["dtype"]
    rope = config.get("rope_parameters")
    # One RoPE for every layer. A dict of them by layer type (Gemma 3's full/sliding attention) has
    # model-specific 4.x names (rope_local_base_freq); such a config is written as transformers 5 has it.
    if isinstance(rope, dict) and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            fields["partial_rotary_factor"] = rope["partial_rotary_factor"]
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        fields["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return {k: v for k, v in fields.items() if k not in config}


def write_tokenizer(tokenizer: Any, out: Path) -> None:
    """`tokenizer.save_pretrained(out)` (chat_template.jinja included), with a class name 4.x knows and the
    template also in tokenizer_config.json, the only place transformers before 4.47 looked for it."""
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    if saved.get("tokenizer_class") == "TokenizersBackend" and (out / "tokenizer.json").is_file():
        saved["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(tokenizer.chat_template, str):
        saved.setdefault("chat_template", tokenizer.chat_template)
    path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")


def turn_end_ids(tokenizer: Any) -> list[int]:
    """The special token the tokenizer's chat template closes an assistant turn with (ChatML's
    `<|im_end|>`, Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`, Mistral's EOS), as a list: [] when the
    template closes it with plain text or has none. The model learns to emit it, so generation must stop
    there even when the model's own EOS is another token (a base model trained with `chatml`)."""
    if not isinstance(tokenizer.chat_template, str):
        return []
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARKER}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    after = text[text.rfind(_MARKER) + len(_MARKER):].strip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1] if after else []
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return [i for i in ids if i in special or i in tokenizer.all_special_ids]


def with_end_ids(eos_token_id: int | list[int] | None, extra: list[int]) -> int | list[int] | None:
    """A generation config's `eos_token_id` that also stops at `extra` (its form kept when nothing is added)."""
    have = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    missing = [i for i in extra if i not in have]
    return have + missing if missing else eos_token_id


def readable_as_normal_files(folder: Path) -> None:
    """Give every file the mode `open()` gives (0666 less the umask; folders 0777 less it), as config.json has.

    safetensors >= 0.8 writes through a temporary file, created 0600, renamed into place
    (safetensors/safetensors#782, fix pending in #789): a server running as another user could not read
    the weights. Harmless once upstream is fixed; tests/test_export.py says when that has happened."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it; restored at once
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def usage(out: Path, task: Any, adapter_base: str | None = None) -> str:
    """How to load the folder of a `task` (a `sft_dist.tasks.Task`): what `sft-dist export` and the demo
    print after writing it."""
    auto_class = task.auto_class
    where = str(out.resolve())
    if adapter_base is not None:
        return (f"adapter folder: {where}\nload it on its base:\n"
                f"  from peft import PeftModel\n  from transformers import {auto_class}\n"
                f"  model = PeftModel.from_pretrained({auto_class}.from_pretrained({adapter_base!r}), {where!r})")
    if not task.generates:
        return (f"model folder: {where}\nuse it:\n  from transformers import pipeline\n"
                f"  print(pipeline({task.pipeline!r}, model={where!r})(...))")
    return (f"model folder: {where}\nchat with it:\n  from transformers import pipeline\n"
            f"  chat = pipeline('text-generation', model={where!r})\n"
            "  print(chat([{'role': 'user', 'content': 'Hello!'}], max_new_tokens=64)"
            "[0]['generated_text'][-1]['content'])")
