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
# No system turn: some templates (Mistral's) refuse one, and the data may have none.
SAMPLE = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def chat_template(tokenizer: Any, configured: str | None) -> str:
    """The template text to render with, checked once on a sample conversation."""
    if configured:
        template, key = _configured(configured), "data.chat_template"
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

