"""Checkpoint to a Hugging Face folder: safetensors weights, config, tokenizer (with the chat template the
run trained with) or image processor, and generation config, loadable with the task's
`AutoModelFor...from_pretrained(DIR)` and `pipeline(...)`, by transformers 5 and by the 4.x line alike
(sft_dist.modeling.model_folder). A LoRA checkpoint becomes the adapter folder `PeftModel.from_pretrained(base, DIR)`
loads, or with `merge_lora` the base with the adapter merged in, a plain model folder.

ZeRO shards are consolidated by DeepSpeed's own reader in lazy mode, and written one output shard at a
time, so the whole model is never in one process's memory at once. The folder is staged beside `out` and
renamed into place: it appears whole or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig

from sft_dist import checkpoints
from sft_dist.config import RunConfig
from sft_dist.data.templates import chat_template
from sft_dist.errors import UserError
from sft_dist.modeling import adapters, model_folder
from sft_dist.modeling import model as model_lib
from sft_dist.tasks import task_of

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_SHARD_SIZE = "2GB"


def export(source: Path, out: Path, dtype: str = "fp32", merge_lora: bool = False, origin: str | None = None,
           trust_remote_code: bool = False) -> tuple[Path, str]:
    """Write the checkpoint `source` names (a run folder: its best, else its latest) to `out`; returns the
    checkpoint folder and the lines that say how to load the result. `origin`: where the checkpoint came
    from, when `source` is a local copy of one in an object store. The checkpoint's own config never
    switches trust_remote_code on: only `trust_remote_code` (the command's flag, or the run's) does."""
    folder = checkpoints.choose(source.resolve()).local_path()  # refuses a checkpoint whose pickles would run code
    manifest = checkpoints.read_manifest(folder)
    cfg = checkpoints.saved_config(folder, trust_remote_code)
    if merge_lora and not adapters.enabled(cfg.peft):
        raise UserError("--merge-lora: this checkpoint is a full fine-tune (peft.method: none), not an adapter one",
                        file=str(folder))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        adapter_only = write_folder(folder, staging, cfg, DTYPES[dtype], merge_lora)
        (staging / "sft_dist_export.json").write_text(json.dumps({"checkpoint": origin or str(folder),
                                                                        "step": manifest.step}))
        model_folder.readable_as_normal_files(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never a half-written folder
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    base = cfg.model.name_or_path if adapter_only else None
    return folder, model_folder.usage(out, task_of(cfg), base)


def write_folder(folder: Path, out: Path, cfg: RunConfig, dtype: torch.dtype, merge_lora: bool) -> bool:
    """The folder's files; True when it is an adapter folder (which needs its base to load)."""
    if adapters.enabled(cfg.peft):
        write_lora(folder, out, cfg, dtype, merge_lora)
        return not merge_lora
    write_weights(consolidated(folder, cfg.deepspeed.stage), out, dtype, model_lib.skeleton(cfg.model))
    write_metadata(cfg, out, dtype)
    return False


def consolidated(folder: Path, stage: int) -> dict[str, Any]:
    """The checkpoint's full weights by name. Under ZeRO, DeepSpeed's lazy tensors, gathered from every
    rank's fp32 optimizer partition when materialised (`.contiguous()`); without ZeRO, rank 0's module."""
    if stage > 0:
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=checkpoints.TAG, lazy_mode=True)
    return rank0_module(folder)


def write_weights(weights: dict[str, Any], out: Path, dtype: torch.dtype, skeleton: torch.nn.Module) -> None:
    """The weights as safetensors shards (with an index when there are several), each tensor once.

    Written here rather than by DeepSpeed's `convert_zero_checkpoint_to_state_dict`, which writes every name
    of a tied parameter (SmolLM2's, Llama 3.2's, Qwen2.5's and Gemma's `lm_head.weight` is
    `model.embed_tokens.weight`): safetensors refuses tensors that share memory. As `save_pretrained` does,
    the alias is left out and `from_pretrained` ties it again from the model's config."""
    aliases = tied_aliases(skeleton)
    for alias in aliases:
        weights.pop(alias, None)
    check_fits(weights, {k: v for k, v in skeleton.state_dict().items() if k not in aliases})
    # Shapes and dtypes are all the split needs, so it is planned on empty tensors before any is gathered.
    split = split_torch_state_dict_into_shards(to_torch_tensor(weights, return_empty_tensor=True, dtype=dtype),
                                               max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        shard = to_torch_tensor({name: weights.pop(name) for name in names}, dtype=dtype)
        save_file(shard, out / filename, metadata={"format": "pt"})
        del shard  # one shard in memory at a time
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_fits(weights: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    """Refuse weights whose names or shapes are not the model's (the checkpoint's recorded model changed)."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    reshaped = sorted(n for n in set(weights) & set(expected) if tuple(weights[n].shape) != tuple(expected[n].shape))
    if missing or unexpected or reshaped:
        raise UserError(f"the checkpoint's weights do not match the model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, other shapes {reshaped[:3]}", key="model.name_or_path")


def tied_aliases(model: torch.nn.Module) -> list[str]:
    """Parameter names that are another name of an earlier parameter (a tied head), as the model ties them."""
    first = {name for name, _ in model.named_parameters()}
    return [name for name, _ in model.named_parameters(remove_duplicate=False) if name not in first]


def write_metadata(cfg: RunConfig, out: Path, dtype: torch.dtype) -> None:
    m, task = cfg.model, task_of(cfg)
    config = AutoConfig.from_pretrained(m.name_or_path, gguf_file=m.gguf_file, trust_remote_code=m.trust_remote_code,
                                        **task.head_config(m))  # a classifier's label names go with it
    config.dtype = dtype
    if task.names_architecture:
        config.architectures = [task.architecture(config)]
    model_folder.write_config(config, out)
    tokenizer = write_preprocessor(cfg, out)
    if task.saves_generation_config:  # e.g. Whisper's: its decoder prompt, suppressed tokens, lengths
        GenerationConfig.from_pretrained(m.name_or_path).save_pretrained(out)
    if not task.generates:
        return
    try:
        generation = GenerationConfig.from_pretrained(m.name_or_path)
    except OSError:  # no generation_config.json (e.g. a GGUF source): derive it from the model config
        generation = GenerationConfig.from_model_config(config)
    # Stop where the trained template ends a turn, also when that is not the model's own EOS.
    generation.eos_token_id = model_folder.with_end_ids(generation.eos_token_id, model_folder.turn_end_ids(tokenizer))
    generation.save_pretrained(out)


def write_preprocessor(cfg: RunConfig, out: Path) -> Any:
    """The tokenizer the run trained with, its chat template `data.chat_template` when set; or an image
    classifier's image processor, an audio model's feature extractor, or a processor (a vision-language
    model's, a speech recogniser's): what `pipeline(...)` needs besides the model. Returns the tokenizer."""
    m, task = cfg.model, task_of(cfg)
    if task.preprocessor == "image_processor":
        model_lib.load_image_processor(m).save_pretrained(out)
        return None
    if task.preprocessor == "feature_extractor":
        model_lib.load_feature_extractor(m).save_pretrained(out)
        return None
    if task.preprocessor == "processor":  # the tokenizer with an image processor or feature extractor (and template)
        processor = model_lib.load_processor(m.name_or_path, m.trust_remote_code)
        processor.save_pretrained(out)
        return processor.tokenizer
    tokenizer = model_lib.load_tokenizer(m)
    if task.generates and cfg.data.chat_template:
        tokenizer.chat_template = chat_template(tokenizer, cfg.data.chat_template)
    model_folder.write_tokenizer(tokenizer, out)
    return tokenizer


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
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=checkpoints.TAG)
    return rank0_module(folder)


def rank0_module(folder: Path) -> dict[str, torch.Tensor]:
    """Without ZeRO every rank holds the whole module: rank 0's model-states file has it."""
    states = torch.load(folder / checkpoints.TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return dict(states["module"])
