"""Parameter-efficient fine-tuning through the `peft` library: wrapping the built model in LoRA (and
its DoRA / rsLoRA variants, QLoRA on a 4-bit base, or another peft method named by `peft.method`), the
trainable-parameter report, and, for export, the adapter folder and the merge into the base. Imports
neither Ray nor DeepSpeed.

Precision (decided here, for every ZeRO stage): the adapter's forward copy has the dtype of the frozen
base's compute (`train.precision`), so DeepSpeed's flat ZeRO buffers hold one dtype; its master weights
and Adam moments are fp32, kept by DeepSpeed's mixed-precision optimizer for trainable parameters only.
That is what keeps LoRA stable in bf16: bf16 keeps about three significant digits, so an update smaller
than ~0.4% of a weight would round away, while the fp32 master accumulates it. The frozen base has no master copy and
no optimizer
state at all, which is where LoRA's memory saving comes from.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft import PeftConfig as PeftMethodConfig
from peft.config import PromptLearningConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from sft_dist.config import ModelConfig, PeftConfig
from sft_dist.errors import UserError
from sft_dist.modeling import model as model_lib
from sft_dist.tasks import TASKS

ADAPTER_NAME = "default"  # peft's name for the one adapter; it appears inside parameter names


def enabled(cfg: PeftConfig) -> bool:
    return cfg.method != "none"


def method_config(cfg: PeftConfig, task: str = "causal_lm") -> PeftMethodConfig:
    """peft's config for `peft.method`, or a UserError naming the key at fault."""
    config_class = _config_class(cfg.method)
    known = _fields(config_class)
    unknown = sorted(set(cfg.options) - known)
    if unknown:
        raise UserError(f"not a field of peft's {config_class.__name__}; its fields: "
                        f"{', '.join(sorted(known - {'peft_type', 'task_type', 'revision', 'auto_mapping'}))}",
                        key=f"peft.options.{unknown[0]}")
    # A text classification task type makes peft train and save the new head in full (modules_to_save);
    # peft has no image task type, so an image classifier's head is named here.
    heads = list(TASKS[task].head_modules)
    if (cfg.modules_to_save or heads) and "modules_to_save" not in known:
        raise UserError(f"peft's {config_class.__name__} trains no extra modules in full"
                        + (", which an image classifier's new head needs" if heads else ""),
                        key="peft.modules_to_save" if cfg.modules_to_save else "peft.method")
    common = {"task_type": TASKS[task].peft_task_type, "target_modules": cfg.target_modules}
    if "modules_to_save" in known:
        common["modules_to_save"] = [*heads, *cfg.modules_to_save] or None
    if config_class is LoraConfig:
        common |= {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_dora": cfg.use_dora,
                   "use_rslora": cfg.use_rslora}
    init = str(cfg.options.get("init_lora_weights", ""))
    if init.startswith(BASE_CHANGING_INITS):
        raise UserError(f"{init} changes the frozen base weights, which adapter checkpoints and exports do not "
                        "hold; use true (the default), gaussian or orthogonal", key="peft.options.init_lora_weights")
    if cfg.method == "ia3" and cfg.target_modules == "all-linear":
        # peft saves all-linear as full module paths but feedforward_modules as short names, and then
        # refuses to load its own adapter_config.json (huggingface/peft#2429, still so in peft 0.21).
        raise UserError("ia3 with all-linear saves an adapter peft cannot load again (peft issue 2429); name "
                        "the modules, e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
                        key="peft.target_modules")
    try:
        return config_class(**common, **cfg.options)
    except (TypeError, ValueError) as err:  # peft's own checks of the combination, e.g. ia3's feedforward_modules
        raise UserError(f"peft's {config_class.__name__} refused it: {err}", key="peft.options") from None


# LoRA initialisations that subtract the initial adapter from the base weights (the base then differs
# from the pretrained model that export and resume rebuild it from).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")

# Methods that prepend virtual tokens change sequence lengths and positions, which packing, the label
# masks and ZeRO-3's fixed shapes assume; methods named here need model-specific wiring peft does not do
# generically. Every other peft method that puts adapters on `target_modules` goes through `method_config`.
UNSUPPORTED_METHODS = {"adaption_prompt": "LLaMA-Adapter patches attention of Llama models only",
                       "adalora": "AdaLoRA reallocates ranks from a hook in the training loop and adds a loss term "
                                  "that sft_dist's loop does not run; use lora",
                       "xlora": "X-LoRA mixes several trained LoRA adapters; train those first"}


def check(cfg: PeftConfig, model_cfg: ModelConfig, zero3: bool) -> None:
    """Refuse, before Ray starts, an adapter peft cannot build on this model (an unknown method or option,
    target modules the model lacks, a method that cannot work on ZeRO-3's partitioned weights): dry runs
    on weightless copies of the model, which cost no load."""
    method = method_config(cfg, model_cfg.task)
    _dry_run(cfg, model_lib.skeleton(model_cfg), method, f"peft cannot put {cfg.method} adapters on "
             f"{model_cfg.name_or_path}")
    if zero3:
        _dry_run(cfg, _as_zero3_partitioned(model_lib.skeleton(model_cfg)), method,
                 f"peft's {cfg.method} cannot be built on ZeRO-3's partitioned weights (use deepspeed.stage 2, "
                 "or a method that reads ZeRO-3's full shapes, such as lora or ia3)")


def _dry_run(cfg: PeftConfig, skeleton: torch.nn.Module, method: PeftMethodConfig, failure: str) -> None:
    try:
        model = _peft_model(skeleton, method)
    except NotImplementedError:  # the method computes from weight values, which a weightless copy lacks
        return
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as err:
        raise UserError(f"{failure}: {type(err).__name__}: {err}", key="peft") from None
    # modules_to_save (a classifier's head) are copies of the model's own modules, emptied here as they
    # are partitioned under ZeRO-3: not adapters sized from a shape.
    empty = [name for name, p in model.named_parameters()
             if p.requires_grad and p.numel() == 0 and ".modules_to_save." not in name]
    if empty:  # an adapter sized from an emptied weight's shape: it would silently train nothing
        raise UserError(f"{failure}: empty adapter tensors such as {empty[0]}", key="peft")


def _as_zero3_partitioned(model: torch.nn.Module) -> torch.nn.Module:
    """What a parameter shows after ZeRO-3 partitions it: empty data, its full shape in `ds_shape`. peft
    methods that size their adapters from `ds_shape` build on it; those that read `weight.shape` fail,
    just as they would on the real partitioned model after minutes of loading."""
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0, dtype=param.dtype, device="meta")
    return model


def _config_class(method: str) -> type[PeftMethodConfig]:
    if method in ("lora", "qlora"):
        return LoraConfig
    by_name = {peft_type.value.lower(): c for peft_type, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    others = sorted(name for name, c in by_name.items() if name != "lora" and name not in UNSUPPORTED_METHODS
                    and not issubclass(c, PromptLearningConfig) and "target_modules" in _fields(c))
    if method in others:
        return by_name[method]
    reason = UNSUPPORTED_METHODS.get(method) or (
        "prompt-learning methods add virtual tokens, which packing and label masks do not allow"
        if method in by_name else f"not a method of peft {peft.__version__}")
    raise UserError(f"{method}: {reason}; use none, lora, qlora or one of: {', '.join(others)}", key="peft.method")


def _fields(config_class: type[PeftMethodConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def quantized_loading(cfg: PeftConfig, compute_dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for QLoRA: an NF4 base quantized on this worker's GPU; else none."""
    if cfg.method != "qlora":
        return {}
    from transformers import BitsAndBytesConfig  # needs bitsandbytes only when asked for

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": quantization, "device_map": {"": device}}


def wrap(model: torch.nn.Module, cfg: PeftConfig, train_dtype: torch.dtype, gradient_checkpointing: bool,
         task: str = "causal_lm") -> Any:
    """The model with a fresh adapter (every rank draws the same initial values from the seeded RNG);
    the base frozen. Under ZeRO-3 the base is already partitioned and the new adapter parameters are
    whole: `deepspeed.initialize` partitions them."""
    if not enabled(cfg):
        return model
    if cfg.method == "qlora":
        # Norms in fp32 and input gradients on, as a 4-bit base needs; checkpointing is already set up.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _peft_model(model, method_config(cfg, task))
    for param in model.parameters():
        if param.requires_grad:  # see the module docstring for why the adapter follows the compute dtype
            param.data = param.data.to(train_dtype)
    _keep_frozen_out_of_state_dict(model)
    return model


def _keep_frozen_out_of_state_dict(model: torch.nn.Module) -> None:
    """Make the model's state_dict hold only what training changes (adapter, modules_to_save, buffers),
    so that a checkpoint stays the adapter's size. DeepSpeed's `exclude_frozen_parameters` alone drops
    frozen parameters by their `named_parameters()` names, which leave out tied aliases: SmolLM2's
    `lm_head.weight` (its 113 MB embedding matrix) would otherwise stay in every checkpoint."""
    frozen = [name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def drop_frozen(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name in frozen:
            state_dict.pop(prefix + name, None)

    model.register_state_dict_post_hook(drop_frozen)


def _peft_model(base: torch.nn.Module, method: PeftMethodConfig) -> PeftModel:
    with warnings.catch_warnings():
        # peft still asks transformers for `is_gradient_checkpointing`, deprecated in transformers 5:
        # noise the user cannot act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, method, adapter_name=ADAPTER_NAME)


def trainable_elements(model: torch.nn.Module) -> int:
    """Trainable parameter elements; a ZeRO-3 partitioned parameter counts by its full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def adapter_model(base: torch.nn.Module, cfg: PeftConfig, trained: dict[str, torch.Tensor],
                  task: str = "causal_lm") -> PeftModel:
    """`base` wrapped as in training, with the trained adapter's values (named as in training)."""
    model = _peft_model(base, method_config(cfg, task))
    result = model.load_state_dict(trained, strict=False)
    adapter_keys = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = adapter_keys & set(result.missing_keys)
    if result.unexpected_keys or missing:
        raise ValueError(f"the checkpoint does not match this adapter: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {sorted(missing)[:5]}")
    return model


def save_adapter(model: PeftModel, out: Path, base_name_or_path: str) -> None:
    """The folder `PeftModel.from_pretrained(base, out)` loads: adapter_config.json and safetensors."""
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_name_or_path
    model.save_pretrained(out, safe_serialization=True)


def save_merged(model: PeftModel, out: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """The base with the adapter folded into its weights: a plain model folder, no peft needed to load."""
    merged = model.merge_and_unload()
    merged.to(dtype).save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
