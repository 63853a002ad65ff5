"""Loss masks from real chat templates: the supervised tokens decode to exactly the assistant turns
(with each turn's end marker), and never include system or user text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.data.encode import Encoder
from sft_dist.data.templates import NAMED_TEMPLATES, chat_template
from sft_dist.errors import UserError

from fixtures.data import DATES, TINY_MODEL, data_config, tokenizer

MISTRAL = (  # Mistral-7B-Instruct-v0.1's template: no system role, strict alternation
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
SYSTEM = {"role": "system", "content": "Answer in one word."}
TURNS = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy, please?"},
    {"role": "assistant", "content": "Rome, of course"},
]
# (template in the config, conversation, the end marker each supervised turn must end with)
CASES = {
    "smollm2-own-template": (None, [SYSTEM, *TURNS], "<|im_end|>"),
    "smollm2-default-system-prompt": (None, TURNS, "<|im_end|>"),
    "chatml": ("chatml", [SYSTEM, *TURNS], "<|im_end|>"),
    "llama3": ("llama3", [SYSTEM, *TURNS], "<|eot_id|>"),
    "gemma": ("gemma", [SYSTEM, *TURNS], "<end_of_turn>"),
    "mistral": (MISTRAL, TURNS, "<|im_end|>"),
}


def template_tokenizer():
    """The tiny model's tokenizer with the other templates' special tokens (as their own tokenizers have)."""
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    tok.add_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    return tok


def encode(messages, template=None, tok=None, **overrides) -> dict:
    tok = tok or tokenizer()
    cfg = data_config(str(DATES / "train.jsonl"), **{"max_seq_len": 512, **overrides})
    encoder = Encoder(cfg, tok, chat_template(tok, template))
    out = encoder({"messages": [messages]}, [0])
    return {name: column[0] for name, column in out.items()}


def supervised_runs(tok, row) -> list[str]:
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_supervised_tokens_decode_to_exactly_the_assistant_turns(case):
    template, messages, end = CASES[case]
    tok = template_tokenizer()
    row = encode(messages, template, tok)
    assert row["reason"] is None, row["detail"]
    assistant = [t["content"] for t in messages if t["role"] == "assistant"]
    assert supervised_runs(tok, row) == [content + end for content in assistant]
    supervised_text = "".join(supervised_runs(tok, row))
    for turn in messages:
        if turn["role"] != "assistant":
            assert turn["content"] not in supervised_text
    assert row["num_supervised"] == sum(label != IGNORE_INDEX for label in row["labels"][1:])


def test_the_default_system_prompt_is_rendered_but_never_supervised():
    row = encode(TURNS)
    text = tokenizer().decode(row["input_ids"])
    assert "You are a helpful AI assistant named SmolLM" in text
    assert "SmolLM" not in "".join(supervised_runs(tokenizer(), row))


def test_a_conversation_opening_with_an_assistant_turn_supervises_that_turn():
    row = encode([{"role": "assistant", "content": "Hello there"}, *TURNS])
    assert supervised_runs(tokenizer(), row) == ["Hello there<|im_end|>", "Paris<|im_end|>",
                                                 "Rome, of course<|im_end|>"]


def test_loss_on_all_supervises_every_token():
    row = encode([SYSTEM, *TURNS], loss_on="all")
    assert row["labels"] == row["input_ids"]


def test_a_template_that_refuses_the_conversation_makes_a_bad_row():
    row = encode([SYSTEM, *TURNS], MISTRAL, template_tokenizer())
    assert (row["reason"], row["bad"]) == ("template_error", True)
    assert "roles must alternate" in row["detail"]


def test_truncation_right_cuts_and_counts_and_drop_drops():
    long = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y " * 60}]
    cut = encode(long, max_seq_len=64)
    assert (len(cut["input_ids"]), cut["truncated"], cut["reason"]) == (64, True, None)
    dropped = encode(long, max_seq_len=64, truncation="drop")
    assert (dropped["reason"], dropped["bad"], dropped["input_ids"]) == ("too_long", False, [])


def test_an_example_truncated_before_its_answer_is_dropped_as_too_long():
    # Counted as too long (it is), not as an example without supervision, which it was not before the cut.
    row = encode([{"role": "user", "content": "x " * 80}, {"role": "assistant", "content": "y"}], max_seq_len=64)
    assert (row["reason"], row["bad"]) == ("too_long", False)
    assert "leaves no supervised token" in row["detail"] and row["length"] > 64


def test_template_choice_config_then_tokenizer_else_a_clear_error():
    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    assert chat_template(tok, None) == tok.chat_template
    # (with Llama 3's markers as tokens: without them the template is refused, as the test below shows)
    assert chat_template(template_tokenizer(), "llama3") == NAMED_TEMPLATES["llama3"]
    tok.chat_template = None
    with pytest.raises(UserError) as err:
        chat_template(tok, None)
    assert err.value.key == "data.chat_template" and "chatml" in str(err.value)
    with pytest.raises(UserError) as err:
        chat_template(tok, "no-such-template")
    assert err.value.key == "data.chat_template"
    with pytest.raises(UserError) as err:
        chat_template(tok, "{% for m in messages %}{{ m.content }")  # broken Jinja
    assert err.value.key == "data.chat_template"


@pytest.mark.parametrize("fmt, row, prompt, answer", [
    ("prompt_completion", {"prompt": "2+2=", "completion": "4"}, "2+2=", "4<|im_end|>"),
    ("text", {"text": "Once upon a time"}, "", "Once upon a time<|im_end|>"),
])
def test_plain_formats_supervise_the_completion_and_end_with_eos(fmt, row, prompt, answer):
    cfg = data_config(str(DATES / "train.jsonl"), format=fmt)
    out = Encoder(cfg, tokenizer(), None)({k: [v] for k, v in row.items()}, [0])
    encoded = {name: column[0] for name, column in out.items()}
    assert encoded["input_ids"][-1] == tokenizer().eos_token_id
    assert "".join(supervised_runs(tokenizer(), encoded)) == answer
    assert tokenizer().decode(encoded["input_ids"]) == prompt + answer


def test_a_named_template_whose_markers_the_tokenizer_lacks_is_refused():
    # The tiny model's tokenizer has ChatML's markers but not Llama 3's: they would split into pieces.
    assert chat_template(tokenizer(), "chatml") == NAMED_TEMPLATES["chatml"]
    with pytest.raises(UserError) as err:
        chat_template(tokenizer(), "llama3")
    assert "<|eot_id|>" in str(err.value) and "pieces" in str(err.value) and "data.chat_template" in str(err.value)
