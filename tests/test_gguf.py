"""A model given as a GGUF file (`model.gguf_file`, the path of the demo's weights): a tiny GGUF written
from the tiny Llama with the `gguf` package trains, and what transformers reads back from it (weights,
tokenizer, chat template) is the source model's. In process (--no-ray): Ray is not the subject."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sft_dist.config import ModelConfig
from sft_dist.modeling.model import build, load_tokenizer

from conftest import REPO, eval_losses, eval_set_loss, read_events, train_tiny
from fixtures.gguf_model import write_tiny_llama_gguf

TINY_MODEL = REPO / "configs" / "models" / "tiny-llama"
GGUF = "tiny-llama-f32.gguf"


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory):
    """A folder holding the GGUF alone: no config.json or tokenizer.json for a loader to fall back on."""
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_llama_gguf(TINY_MODEL, folder / GGUF)
    return folder


def test_a_gguf_model_trains_from_its_source_models_weights(gguf_folder, tmp_path):
    run = train_tiny(tmp_path, f"model.name_or_path={gguf_folder}", f"model.gguf_file={GGUF}", "train.max_steps=2",
                     "eval.at_end=false", "eval.generate=null", extra_args=("--no-ray",))
    assert [e["step"] for e in read_events(run) if "loss" in e] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    # Step 0 is the loaded model itself: the engine's validation loss is the source model's own loss on
    # the same examples (q and k left in llama.cpp's rotary layout would not be).
    source = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    assert eval_losses(run)[0] == pytest.approx(eval_set_loss(source, tmp_path), rel=1e-5)


def test_the_gguf_model_is_the_source_model_bit_for_bit(gguf_folder):
    """sft_dist's own model build from the GGUF: every logit equals the source model's (fp32 both ways)."""
    loaded = build(ModelConfig(name_or_path=str(gguf_folder), gguf_file=GGUF), torch.float32).eval()
    source = AutoModelForCausalLM.from_pretrained(TINY_MODEL).eval()
    ids = torch.tensor([list(range(1, 60, 3))])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, source(input_ids=ids).logits)


def test_the_gguf_tokenizer_gives_the_source_tokenizers_ids_and_chat_template(gguf_folder):
    from_gguf = load_tokenizer(ModelConfig(name_or_path=str(gguf_folder), gguf_file=GGUF))
    source = load_tokenizer(ModelConfig(name_or_path=str(TINY_MODEL)))
    assert from_gguf.chat_template == source.chat_template
    assert (from_gguf.pad_token, from_gguf.eos_token) == (source.pad_token, source.eos_token)
    rows = [json.loads(line) for line in (REPO / "configs" / "data" / "dates" / "train.jsonl").read_text().splitlines()]
    for row in rows:  # special tokens kept whole, digits one by one, as the source's pre-tokenizer splits them
        assert from_gguf.apply_chat_template(row["messages"]) == source.apply_chat_template(row["messages"])
