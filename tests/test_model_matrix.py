"""Every model family through the whole chain: train -> checkpoint -> resume -> export (and --merge-lora) ->
`from_pretrained`, on tiny models of the families users fine-tune (launch/make_tiny_model.py): untied
Llama (SmolLM2), tied Qwen2 with attention bias and no BOS, tied Gemma whose template refuses a system turn,
untied Mistral with an [INST] template. In-process runs (world size 1, real DeepSpeed engines); one tied
family on 2 Ray workers under ZeRO-3, where the tied head is partitioned.

Expected values come from elsewhere: the exported model's own `model(input_ids, labels=...).loss` against
the engine's validation loss as the run recorded it; masks derived from the tokenizer's own
`apply_chat_template` token ids, not from sft_dist's character spans; logits and chat renderings read by the
older transformers in .venv-compat against this one's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_dist import checkpoints
from sft_dist.cli import main

from conftest import REPO, eval_losses, read_events, train_losses, train_tiny
from fixtures.exported import hf_eval_loss, older_client, saved_rows
from fixtures.model_client import look

MODELS = REPO / "configs" / "models"
DATES = REPO / "configs" / "data" / "dates"
# Each family twice, full fine-tune and LoRA, at two of the three stages; together every stage with both.
# The tied families' heads under ZeRO-2 and ZeRO-3 (where DeepSpeed's own converter failed).
CASES = [("llama", 0, "full"), ("llama", 3, "lora"), ("qwen2", 2, "full"), ("qwen2", 0, "lora"),
         ("gemma", 3, "full"), ("gemma", 2, "lora"), ("mistral", 3, "full"), ("mistral", 0, "lora")]
IDS = [f"{family}-zero{stage}-{mode}" for family, stage, mode in CASES]
STEPS = 3
COMMON = (f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "eval.at_start=false", "eval.generate=null",
          "train.warmup_ratio=0")
LORA = ("peft.method=lora", "peft.r=4", "peft.alpha=8", "train.lr=1e-2")


@dataclass
class Chain:
    family: str
    first: Path  # the run that saved checkpoints at steps 2 and 3
    resumed: Path  # a new run from the first one's step-2 checkpoint, to step 3
    exports: dict[str, Path]  # "model" (full fine-tune), or "adapter" and "merged"


_chains: dict[str, Chain] = {}


def chain(case: tuple[str, int, str], root: Path) -> Chain:
    """Train, resume and export one case (once per session; the compat test reuses every case)."""
    key = "-".join(map(str, case))
    if key not in _chains:
        family, stage, mode = case
        settings = (*COMMON, f"model.name_or_path={MODELS / f'tiny-{family}'}", f"deepspeed.stage={stage}",
                    *(LORA if mode == "lora" else ()))
        out = root / key
        first = train_tiny(out, *settings, extra_args=("--no-ray",), run_name="first")
        resumed = train_tiny(out, *settings, run_name="resumed",
                             extra_args=("--no-ray", "--resume", str(first / checkpoints.folder_name(2))))
        exports = {"adapter": out / "adapter", "merged": out / "merged"} if mode == "lora" else {"model": out / "model"}
        for name, folder in exports.items():
            assert main(["export", str(resumed), "--out", str(folder),
                         *(["--merge-lora"] if name == "merged" else [])]) == 0
        _chains[key] = Chain(family, first, resumed, exports)
    return _chains[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix")


def load(chain_: Chain, name: str) -> torch.nn.Module:
    if name == "adapter":
        base = AutoModelForCausalLM.from_pretrained(MODELS / f"tiny-{chain_.family}")
        return PeftModel.from_pretrained(base, chain_.exports["adapter"]).eval()
    return AutoModelForCausalLM.from_pretrained(chain_.exports[name]).eval()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resume_export_and_load_reproduce_the_engine(case, root):
    c = chain(case, root)
    assert [e["step"] for e in read_events(c.resumed) if e.get("event") == "resume"] == [2]
    assert train_losses(c.resumed) == pytest.approx(train_losses(c.first)[2:], rel=1e-5)
    engine_loss = eval_losses(c.resumed)[-1]
    assert engine_loss == pytest.approx(eval_losses(c.first)[-1], rel=1e-5)
    rows = saved_rows(c.resumed, "eval")
    for name in c.exports:
        assert hf_eval_loss(load(c, name), rows) == pytest.approx(engine_loss, rel=1e-5), name


def independent_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels from the template's own token ids: an assistant turn is supervised from the end of
    the rendering before it (with the generation prompt) to the end of the rendering through it, less the
    whitespace after its end token."""
    def ids(turns, prompt=False):
        return tokenizer.apply_chat_template(turns, add_generation_prompt=prompt, return_dict=True)["input_ids"]

    full = ids(messages)
    labels = [-100] * len(full)
    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            start, end = len(ids(messages[:i], prompt=True)), len(ids(messages[: i + 1]))
            while end > start and not tokenizer.decode(full[end - 1:end]).strip():
                end -= 1
            labels[start:end] = full[start:end]
    return full, labels


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "mistral"])
def test_masks_are_the_assistant_turns_under_each_template(family, root):
    """Every training row the engines were fed, against masks derived from the tokenizer's own template."""
    case = next(c for c in CASES if c[0] == family)
    rows = saved_rows(chain(case, root).first, "train")
    trained = {tuple(r["input_ids"]): r["labels"] for r in rows}
    tokenizer = AutoTokenizer.from_pretrained(MODELS / f"tiny-{family}")
    conversations = [json.loads(line)["messages"] for line in (DATES / "train.jsonl").read_text().splitlines()]
    assert len(trained) == len(conversations)
    for messages in conversations:
        ids, labels = independent_labels(tokenizer, messages)
        assert trained[tuple(ids)] == labels
    ends = {tokenizer.decode([[label for label in row["labels"] if label != -100][-1]]) for row in rows}
    assert ends == {{"llama": "<|im_end|>", "qwen2": "<|im_end|>", "gemma": "<end_of_turn>", "mistral": "</s>"}[family]}


def test_an_older_transformers_reads_every_export_as_this_one_does(root):
    """transformers 4.57 (what serving stacks pin) against this one: the same tokenizer behaviour, chat
    rendering, RoPE base and logits. Without the 4.x fields it could not load the tokenizer at all, and it
    would run the Qwen2 and Mistral models with rope_theta 10000 instead of 1e6."""
    folders = [str(chain(case, root).exports.get("model", chain(case, root).exports.get("merged"))) for case in CASES]
    older = older_client(folders)
    for folder in folders:
        ours, theirs = look(folder), older[folder]
        assert theirs["transformers"].startswith("4.57") and ours["transformers"].startswith("5.")
        assert (theirs["text"], theirs["ids"], theirs["rope_theta"], theirs["eos_token"]) == (
            ours["text"], ours["ids"], ours["rope_theta"], ours["eos_token"]), folder
        assert torch.allclose(torch.tensor(theirs["logits"]), torch.tensor(ours["logits"]), rtol=1e-5,
                              atol=1e-5), folder


def test_a_tied_head_partitioned_over_two_zero3_workers_exports(ray_cluster, tmp_path):
    run = train_tiny(tmp_path, "train.max_steps=2", "checkpoint.every_steps=2", "eval.at_start=false",
                     "eval.generate=null", f"model.name_or_path={MODELS / 'tiny-qwen2'}", "deepspeed.stage=3")
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied again on load
    # 63 rows on 2 ranks: the odd one out counted once in the engines' all-reduced loss
    assert hf_eval_loss(model, saved_rows(run, "eval")) == pytest.approx(eval_losses(run)[-1], rel=1e-5)
