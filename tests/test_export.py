"""`sft-dist export` as users meet it: the real SmolLM2-135M-Instruct (the quickstart's model, tied
embeddings) fine-tuned and exported by its own run, then loaded by `from_pretrained`, `pipeline(...)` and
an older transformers; the chat template the run trained with (also on a base model without one); bf16;
file modes; and the refusals (no checkpoint yet, a checkpoint that does not fit its model) that leave no
folder behind."""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from sft_dist import checkpoints
from sft_dist.cli import main
from sft_dist.data.templates import NAMED_TEMPLATES

from conftest import REPO, eval_losses, train_tiny
from fixtures.exported import hf_eval_loss, older_client, saved_rows
from fixtures.model_client import look

QUICKSTART = REPO / "configs" / "quickstart.yaml"
SMOLLM2 = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
TINY_LLAMA = REPO / "configs" / "models" / "tiny-llama"
DATES = REPO / "configs" / "data" / "dates"


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory) -> Path:
    """The quickstart, short: 1 step, 5 held-out rows, 2 prompts, trained with ChatML (not SmolLM2's own
    template, which adds a default system prompt), exported by the run itself (checkpoint.export_at_end)."""
    sys.path.insert(0, str(REPO / "launch"))
    from prepare_demo_model import prepare

    prepare(SMOLLM2)  # what launch/test.sh does: fetched and converted once
    root = tmp_path_factory.mktemp("smollm2")
    held_out = root / "eval.jsonl"
    held_out.write_text("".join((DATES / "eval.jsonl").read_text().splitlines(keepends=True)[:5]))
    settings = [f"output_dir={root}", "run_name=run", f"model.name_or_path={SMOLLM2}", f"data.eval={held_out}",
                "data.chat_template=chatml", "train.max_steps=1", "checkpoint.every_steps=1",
                "eval.at_start=false", "eval.generate.num_prompts=2", "ray.threads_per_worker=2"]
    assert main(["train", str(QUICKSTART), "--no-ray", *[a for s in settings for a in ("--set", s)]]) == 0
    return root / "run"


def test_the_demo_model_exports_its_tied_head_once_and_reproduces_the_runs_eval_loss(smollm2_run):
    model_dir = smollm2_run / "model"
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert hf_eval_loss(model, saved_rows(smollm2_run, "eval")) == pytest.approx(eval_losses(smollm2_run)[-1], rel=1e-5)


def test_the_demo_model_answers_through_pipeline_as_the_run_did_with_its_template(smollm2_run):
    chat = pipeline("text-generation", model=str(smollm2_run / "model"))
    assert chat.tokenizer.chat_template == NAMED_TEMPLATES["chatml"]
    (samples,) = [e["samples"] for e in map(json.loads, (smollm2_run / "samples.jsonl").read_text().splitlines())]
    for sample in samples:
        # The unset eval.generate.max_new_tokens: the answer as ChatML renders it ("<|im_end|>\n" after
        # it), plus the margin.
        answer_tokens = len(chat.tokenizer(sample["expected"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
        assert sample["max_new_tokens"] == answer_tokens + max(8, answer_tokens // 4)
        assert not sample["hit_max_new_tokens"]  # the instruct model ends its answers with <|im_end|>
        out = chat([{"role": "user", "content": sample["prompt"]}], max_new_tokens=sample["max_new_tokens"],
                   do_sample=False)
        assert out[0]["generated_text"][-1]["content"].strip() == sample["answer"]


def test_an_older_transformers_reads_the_demo_model_as_this_one_does(smollm2_run):
    """transformers 4.57 ignores `rope_parameters`: without the 4.x `rope_theta` it ran SmolLM2 with 10000
    instead of 100000, and without a class name it knows it could not load the tokenizer."""
    folder = str(smollm2_run / "model")
    ours, theirs = look(folder), older_client([folder])[folder]
    assert theirs["rope_theta"] == ours["rope_theta"] == 100000.0
    assert (theirs["text"], theirs["ids"]) == (ours["text"], ours["ids"])
    assert torch.allclose(torch.tensor(theirs["logits"]), torch.tensor(ours["logits"]), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """tiny-llama as a base model is shipped: no chat template, and its EOS is <|endoftext|>."""
    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(TINY_LLAMA, folder)
    (folder / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "eos_token": "<|endoftext|>"}))
    GenerationConfig(bos_token_id=1, eos_token_id=0, pad_token_id=0).save_pretrained(folder)
    return folder


TINY_RUN = ("train.max_steps=1", "checkpoint.every_steps=1", "eval.at_start=false", "eval.generate=null",
            "data.chat_template=chatml", "deepspeed.stage=2")


@pytest.fixture(scope="module")
def base_run(base_model, tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("base-run"), *TINY_RUN, f"model.name_or_path={base_model}",
                      extra_args=("--no-ray",))


@pytest.fixture(scope="module")
def base_export(base_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base-export") / "model"
    assert main(["export", str(base_run), "--out", str(out)]) == 0
    return out


def test_a_base_model_trained_with_a_named_template_exports_it_and_stops_at_its_turn_end(base_run, base_export):
    tokenizer = AutoTokenizer.from_pretrained(base_export)
    assert tokenizer.chat_template == NAMED_TEMPLATES["chatml"]
    # The exported tokenizer renders every training conversation into exactly the tokens the engine saw.
    trained = {tuple(row["input_ids"]) for row in saved_rows(base_run, "train")}
    for line in (DATES / "train.jsonl").read_text().splitlines():
        rendered = tokenizer.apply_chat_template(json.loads(line)["messages"], return_dict=True)["input_ids"]
        assert tuple(rendered) in trained
    # ChatML ends a turn with <|im_end|> (id 2), which this base model's EOS (0) is not.
    assert GenerationConfig.from_pretrained(base_export).eos_token_id == [0, 2]
    # transformers before 4.47 read the template only from tokenizer_config.json.
    assert json.loads((base_export / "tokenizer_config.json").read_text())["chat_template"] == NAMED_TEMPLATES["chatml"]


def test_a_chat_model_trained_with_another_template_exports_that_one(tmp_path):
    run = train_tiny(tmp_path, *TINY_RUN, "deepspeed.stage=0", extra_args=("--no-ray",))
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 0
    own = AutoTokenizer.from_pretrained(TINY_LLAMA).chat_template
    exported = AutoTokenizer.from_pretrained(tmp_path / "model").chat_template
    assert exported == NAMED_TEMPLATES["chatml"] != own


def test_export_files_are_readable_by_other_users(base_export):
    for path in [base_export, *base_export.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_safetensors_still_writes_owner_only_files(tmp_path):
    """Upstream canary for model_folder.readable_as_normal_files (safetensors#782): when this fails,
    safetensors writes files with the umask's mode again and the workaround can go."""
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o600


def test_a_bf16_export_is_bf16_and_close_to_fp32(base_run, base_export, tmp_path):
    assert main(["export", str(base_run), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(base_export).eval()
    rows = saved_rows(base_run, "eval")
    assert hf_eval_loss(bf16, rows) == pytest.approx(hf_eval_loss(fp32, rows), rel=1e-2)
    assert hf_eval_loss(bf16, rows) != hf_eval_loss(fp32, rows)  # really rounded


def test_a_run_without_checkpoints_says_how_to_get_one(tmp_path, capsys):
    run = train_tiny(tmp_path, "train.max_steps=1", "eval.at_start=false", "eval.at_end=false",
                     "eval.generate=null", extra_args=("--no-ray",))
    capsys.readouterr()  # the run's own output
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run) in err[0] and "checkpoint.every_steps" in err[0]
    assert not (tmp_path / "model").exists()


def test_a_checkpoint_that_does_not_fit_its_model_leaves_no_folder(base_run, tmp_path, capsys):
    """A checkpoint whose recorded model is another architecture (here Qwen2, with attention biases the
    Llama checkpoint lacks): one line naming the keys, exit 2, and neither the folder nor its staging copy."""
    copy = tmp_path / checkpoints.folder_name(1)
    shutil.copytree(base_run / checkpoints.folder_name(1), copy)
    manifest = checkpoints.read_manifest(copy)
    manifest["config"]["model"]["name_or_path"] = str(REPO / "configs" / "models" / "tiny-qwen2")
    (copy / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["export", str(copy), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert "do not match the model" in err and "q_proj.bias" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [copy.name]


def test_export_prints_how_to_chat_with_the_model(base_run, tmp_path, capsys):
    assert main(["export", str(base_run), "--out", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert f"model folder: {tmp_path / 'model'}" in out and "pipeline('text-generation'" in out
