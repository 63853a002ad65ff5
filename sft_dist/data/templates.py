"""Which chat template renders conversations: `data.chat_template` when given (a name below, Jinja text,
or a `.jinja` file), else the tokenizer's own; a clear error when neither exists.

The named templates are the published ones, verbatim in structure, for tokenizers that ship without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_dist.errors import UserError

NAMED_TEMPLATES = {
    # ChatML (Qwen, SmolLM2, ...), without a default system prompt.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Meta Llama 3 Instruct.
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Google Gemma: no system role (folded into the first user turn), the assistant is called "model".
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
        "+ message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}
# The markers each named template writes: its own tokenizer has each as one special token; another
# tokenizer would split them into pieces, and the model would learn a format it was never given.
NAMED_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
# No system turn: some templates (Mistral's) refuse one, and the data may have none.
SAMPLE = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def chat_template(tokenizer: Any, configured: str | None) -> str:
    """The template text to render with, checked once on a sample conversation."""
    if configured:
        template, key = _configured(configured), "data.chat_template"
        _check_markers(tokenizer, configured)
    elif tokenizer.chat_template:
        template, key = tokenizer.chat_template, "model.name_or_path"
    else:
        raise UserError(f"the tokenizer has no chat template; set data.chat_template to one of "
                        f"{', '.join(NAMED_TEMPLATES)}, to Jinja text, or to a .jinja file", key="data.chat_template")
    try:
        tokenizer.apply_chat_template(SAMPLE, chat_template=template, tokenize=False)
    except Exception as err:  # Jinja syntax errors and the template's own raise_exception
        raise UserError(f"the chat template does not render a user/assistant conversation: {err}",
                        key=key) from None
    return template


def _configured(value: str) -> str:
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if value.endswith(".jinja"):
        if not Path(value).expanduser().is_file():
            raise UserError(f"file not found: {value}", key="data.chat_template")
        return Path(value).expanduser().read_text()
    if "{{" in value or "{%" in value:
        return value
    raise UserError(f"{value!r} is not a known template ({', '.join(NAMED_TEMPLATES)}), Jinja text, "
                    "or a .jinja file", key="data.chat_template")


def _check_markers(tokenizer: Any, name: str) -> None:
    """Refuse a named template whose markers this tokenizer lacks (rather than add them: new tokens need
    new embedding rows, trained from nothing, which the user should choose knowingly)."""
    missing = [(marker, len(tokenizer.tokenize(marker))) for marker in NAMED_MARKERS.get(name, ())
               if marker not in tokenizer.get_vocab()]
    if missing:
        pieces = ", ".join(f"{marker} ({n} pieces)" for marker, n in missing)
        raise UserError(f"the {name} template's markers are not tokens of this tokenizer: {pieces}; use the "
                        "model's own template (leave data.chat_template unset), a template in its own "
                        "tokens, or a tokenizer that has them", key="data.chat_template")
