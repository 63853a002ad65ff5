"""Checkpoint to a Hugging Face folder: safetensors weights, config, tokenizer (with its chat template)
or image processor, and generation config, loadable with the task's `AutoModelFor...from_pretrained(DIR)`
and `pipeline(...)`. A LoRA checkpoint
becomes the adapter folder `PeftModel.from_pretrained(base, DIR)` loads, or with `merge_lora` the
base with the adapter merged in, a plain model folder.

ZeRO shards are consolidated by DeepSpeed's own converter, which materialises one output shard at a
time (lazy mode), so the whole model is never in one process's memory at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict, get_fp32_state_dict_from_zero_checkpoint
from huggingface_hub import save_torch_state_dict
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from sft_dist import adapters, checkpoint, tasks
from sft_dist import model as model_lib
from sft_dist.config import RunConfig
from sft_dist.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_SHARD_SIZE = "2GB"


def export(source: Path, out: Path, dtype: str = "fp32", merge_lora: bool = False,
           trust_remote_code: bool = False) -> Path:
    folder = checkpoint.choose(source.resolve())  # refuses a checkpoint whose pickles would run code
    manifest = checkpoint.read_manifest(folder)
    cfg = checkpoint.saved_config(folder, trust_remote_code)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if merge_lora and not adapters.enabled(cfg.peft):
        raise UserError("--merge-lora: this checkpoint is a full fine-tune (peft.method: none), not an adapter one",
                        file=str(folder))
    if adapters.enabled(cfg.peft):
        write_lora(folder, staging, cfg, DTYPES[dtype], merge_lora)
    else:
        write_weights(folder, staging, DTYPES[dtype], cfg.deepspeed.stage)
        write_metadata(cfg, staging, DTYPES[dtype])
    (staging / "sft_dist_export.json").write_text(json.dumps({"checkpoint": str(folder), "step": manifest["step"]}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # the folder appears whole or not at all
    return folder


def write_weights(folder: Path, out: Path, dtype: torch.dtype, stage: int) -> None:
    if stage > 0:
        convert_zero_checkpoint_to_state_dict(str(folder), str(out), dtype=dtype, max_shard_size=MAX_SHARD_SIZE,
                                              safe_serialization=True, tag=checkpoint.TAG)
        return
    # Without ZeRO every rank holds the whole model; rank 0's model-states file has it.
    states = torch.load(folder / checkpoint.TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    weights = {name: tensor.to(dtype) for name, tensor in states["module"].items()}
    save_torch_state_dict(weights, str(out), max_shard_size=MAX_SHARD_SIZE, safe_serialization=True)


def write_metadata(cfg: RunConfig, out: Path, dtype: torch.dtype) -> None:
    m = cfg.model
    config = AutoConfig.from_pretrained(m.name_or_path, gguf_file=m.gguf_file, trust_remote_code=m.trust_remote_code,
                                        **tasks.head_config(m))  # a classifier's label names go with it
    config.dtype = dtype
    if m.task != "causal_lm":
        config.architectures = [tasks.architecture(config, m.task)]
    config.save_pretrained(out)
    write_preprocessor(cfg, out)
    if m.task != "causal_lm":
        return  # classifiers do not generate
    try:
        generation = GenerationConfig.from_pretrained(m.name_or_path)
    except OSError:  # no generation_config.json (e.g. a GGUF source): derive it from the model config
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)


def write_preprocessor(cfg: RunConfig, out: Path) -> None:
    """The tokenizer, or an image classifier's image processor (what `pipeline(...)` needs besides the model)."""
    m = cfg.model
    if m.task == "image_classification":
        model_lib.load_image_processor(m).save_pretrained(out)
        return
    tokenizer = AutoTokenizer.from_pretrained(m.name_or_path, gguf_file=m.gguf_file, trust_remote_code=m.trust_remote_code)
    tokenizer.save_pretrained(out)


def write_lora(folder: Path, out: Path, cfg: RunConfig, dtype: torch.dtype, merge: bool) -> None:
    """The adapter folder (with the tokenizer), or with `merge` the merged model folder.

    The checkpoint holds only the trained tensors; the frozen base comes from `model.name_or_path`,
    loaded in fp32 so that the merge adds the adapter at full precision before the cast to `dtype`.
    """
    base = model_lib.build(cfg.model, torch.float32)
    model = adapters.adapter_model(base, cfg.peft, trained_tensors(folder, cfg.deepspeed.stage), cfg.model.task)
    if merge:
        adapters.save_merged(model, out, dtype, MAX_SHARD_SIZE)
        write_metadata(cfg, out, dtype)
    else:
        adapters.save_adapter(model.to(dtype), out, cfg.model.name_or_path)
        write_preprocessor(cfg, out)


def trained_tensors(folder: Path, stage: int) -> dict[str, torch.Tensor]:
    """A checkpoint's trained parameters, whole. Under ZeRO they are gathered by DeepSpeed from every
    rank's fp32 optimizer partition: under ZeRO-3 the module file holds only empty placeholders."""
    if stage > 0:
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=checkpoint.TAG)
    states = torch.load(folder / checkpoint.TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return states["module"]
