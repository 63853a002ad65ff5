"""`sft-dist plan CONFIG`: memory per device before a run, for the configured model, world size, ZeRO
stage, offload, precision, micro-batch and sequence length, and the cheapest setting that fits.

Model states (parameters, gradients, optimizer states) use the bytes per parameter of DeepSpeed's own
estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`; a test
checks the figures agree), extended to stages 0 and 1 and to fp32 the same way. Activations use the
standard estimate for transformer layers of Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models" (2022): s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit, the 5·a·s/h term
(attention scores) only with eager attention (sdpa and flash attention do not keep them); with
gradient checkpointing, each layer keeps its 16-bit input (2·s·b·h) and one layer is recomputed at a
time. Plus the logits: s·b·V in the compute dtype, and a float32 copy and its gradient for the loss;
with the chunked loss (`train.chunked_loss`), one chunk's `loss_chunk_tokens` rows of them at a time
(a test checks both against the peak memory `sft-dist bench` measures on a 128k-vocabulary model).

Parameters are counted from the model's config on the meta device, built by the `model.task`'s class
(a classifier with its head, not a language-model head): no weights are read. A classifier's logits
are per label, not per vocabulary entry; a vision transformer's sequence is its patches (and [CLS]),
not `data.max_seq_len`. A speech model's are its encoder's frames: a Whisper-style model pads every
clip to its window (`max_source_positions` frames) and decodes up to `max_target_positions` tokens, its
decoder's layers sized at those and its logits per target token; a wav2vec2-style encoder makes one
frame per product of its convolutions' strides (320 samples: 20 ms at 16 kHz) of the longest clip,
`data.max_audio_s` (30 s when unset, as the report says).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_dist.config import RunConfig
from sft_dist.errors import UserError
from sft_dist.tasks import TASKS, task_of
from sft_dist.tools import plan_speed

GiB = 2**30
# Kept free of the device's memory: CUDA context, allocator fragmentation, communication buckets.
HEADROOM = 0.10
# DeepSpeed's estimators' allowance for host memory buffers.
HOST_BUFFER_FACTOR = 1.5


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    largest_layer_params: int  # the most parameters one module holds directly (ZeRO-3 gathers one at a time)
    hidden: int
    layers: int
    heads: int
    vocab: int  # logits per position: the vocabulary of a causal LM, a classifier's labels
    positions: int | None = None  # a fixed sequence length (patches, audio frames); None: data.max_seq_len
    decoder_layers: int = 0  # an encoder-decoder's decoder (`layers` are then its encoder's)
    decoder_positions: int | None = None  # its longest target: the rows of its logits
    chunkable: bool = False  # `train.chunked_loss: auto` turns the chunked loss on for this model


@dataclass(frozen=True)
class Setting:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    def label(self) -> str:
        offload = "+".join(n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params))
                           if on)
        return f"ZeRO-{self.stage}" + (f" offload {offload}" if offload else "")


def settings() -> list[Setting]:
    """Every setting the table shows, cheapest first (offload costs most, then a higher stage)."""
    plain = [Setting(s) for s in range(4)]
    offloaded = [Setting(1, True), Setting(2, True), Setting(3, True), Setting(3, True, True)]
    return plain + offloaded


# ---------------------------------------------------------------- model states


# Bytes per parameter held on the device by each rank: (replicated, partitioned over the N ranks), for
# params / grads / optimizer (fp32 master weights count as optimizer state). Mixed precision (bf16,
# fp16), as DeepSpeed's estimators count it: 16-bit params 2 and grads 2, fp32 grads 4, fp32 master
# params 4, Adam's two moments 8; ZeRO-3 reduces its 16-bit gradients into the fp32 partition
# (DeepSpeed's 18 bytes / N). fp32: params 4, grads 4, moments 8, no master copy. Offloaded states live
# in host memory (ZeRO-1/2 offload keep the 16-bit params; ZeRO-1 also its full gradients).
MIXED = {  # (stage, offload_optimizer, offload_params) -> {part: (replicated, partitioned)}
    (0, False, False): {"params": (2, 0), "grads": (6, 0), "optimizer": (12, 0)},
    (1, False, False): {"params": (2, 0), "grads": (2, 4), "optimizer": (0, 12)},
    (2, False, False): {"params": (2, 0), "grads": (0, 6), "optimizer": (0, 12)},
    (3, False, False): {"params": (0, 2), "grads": (0, 4), "optimizer": (0, 12)},
    (1, True, False): {"params": (2, 0), "grads": (2, 0), "optimizer": (0, 0)},
    (2, True, False): {"params": (2, 0), "grads": (0, 0), "optimizer": (0, 0)},
    (3, True, False): {"params": (0, 2), "grads": (0, 0), "optimizer": (0, 0)},
    (3, True, True): {"params": (0, 0), "grads": (0, 0), "optimizer": (0, 0)},
}
FP32 = {
    (0, False, False): {"params": (4, 0), "grads": (4, 0), "optimizer": (8, 0)},
    (1, False, False): {"params": (4, 0), "grads": (4, 0), "optimizer": (0, 8)},
    (2, False, False): {"params": (4, 0), "grads": (0, 4), "optimizer": (0, 8)},
    (3, False, False): {"params": (0, 4), "grads": (0, 4), "optimizer": (0, 8)},
    (1, True, False): {"params": (4, 0), "grads": (4, 0), "optimizer": (0, 0)},
    (2, True, False): {"params": (4, 0), "grads": (0, 0), "optimizer": (0, 0)},
    (3, True, False): {"params": (0, 4), "grads": (0, 0), "optimizer": (0, 0)},
    (3, True, True): {"params": (0, 0), "grads": (0, 0), "optimizer": (0, 0)},
}


def model_state_bytes(params: int, largest_layer: int, setting: Setting, precision: str, world: int) -> dict[str, int]:
    """Device bytes per rank of parameters, gradients and optimizer states, and ZeRO-3's gathered layer."""
    table = MIXED if precision in ("bf16", "fp16") else FP32
    parts = table[(setting.stage, setting.offload_optimizer, setting.offload_params)]
    # As DeepSpeed computes it: replicated bytes, plus one integer division of all partitioned bytes
    # (the optimizer's share takes the rounding, so the total equals DeepSpeed's to the byte).
    partitioned_total = int(sum(q for _, q in parts.values()) * params / world)
    out = {name: r * params + int(q * params / world) for name, (r, q) in parts.items()}
    out["optimizer"] += partitioned_total - sum(int(q * params / world) for _, q in parts.values())
    out["gathered_layer"] = 4 * largest_layer if setting.stage == 3 else 0
    return out


def host_bytes_per_node(params: int, largest_layer: int, setting: Setting, world: int, gpus_per_node: int) -> int:
    """Host memory per node, as DeepSpeed's estimators give it (with their 1.5 buffer factor)."""
    nodes = max(1, math.ceil(world / gpus_per_node))
    if setting.stage == 3:
        if setting.offload_optimizer:
            per_param = 18 if setting.offload_params else 16
            return int(params * per_param / nodes * HOST_BUFFER_FACTOR)
        return int(largest_layer * 4 * gpus_per_node * HOST_BUFFER_FACTOR)
    if setting.offload_optimizer:
        return int(params * max(4 * world, 16) * HOST_BUFFER_FACTOR)
    return int(params * 4 * gpus_per_node * HOST_BUFFER_FACTOR)


# ---------------------------------------------------------------- activations


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str, eager_attention: bool,
                     checkpointing: bool, loss_chunk: int | None = None) -> int:
    b, h, a = micro_batch, shape.hidden, shape.heads
    scale = 1 if precision in ("bf16", "fp16") else 2  # the estimate counts 16-bit elements
    stacks = [(shape.layers, seq_len)] + ([(shape.decoder_layers, shape.decoder_positions)]
                                          if shape.decoder_layers and shape.decoder_positions else [])
    per_layer = {s: s * b * h * (34 + (5 * a * s / h if eager_attention else 0)) * scale for _, s in stacks}
    logits = loss_path_bytes(shape.vocab, h, stacks[-1][1] * b, precision, loss_chunk)
    if checkpointing:  # every layer's input kept, one layer recomputed at a time
        return int(sum(n * 2 * s * b * h * scale for n, s in stacks) + max(per_layer.values()) + logits)
    return int(sum(n * per_layer[s] for n, s in stacks) + logits)


def loss_path_bytes(vocab: int, hidden: int, tokens: int, precision: str, loss_chunk: int | None) -> int:
    """The logits rows held at once (all of a micro-batch's tokens, or one chunk of the chunked loss:
    `train.chunked_loss`) in the compute dtype, with a float32 copy and its gradient for the loss. The
    chunked loss also holds one float32 LM-head-sized buffer in its backward (a chunk's weight gradient,
    before it joins the running sum; measured as live bytes on bench's 128k-vocabulary model, a test keeps
    it so)."""
    compute = 2 if precision in ("bf16", "fp16") else 4
    if loss_chunk is None:
        return tokens * vocab * (compute + 8)
    return min(loss_chunk, tokens) * vocab * (compute + 8) + vocab * hidden * 4


# ---------------------------------------------------------------- the model


def model_config_folder(cfg: RunConfig, config_path: Path, given: str | None) -> Path | str:
    """Where the model's config.json is: --model-config, the model folder, `models/{org}--{name}` beside
    the run config (shipped for hub models so plan works offline), else the hub name itself."""
    if given:
        return Path(given)
    name = cfg.model.name_or_path
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    shipped = config_path.parent / "models" / name.replace("/", "--")
    return shipped if (shipped / "config.json").is_file() else name


def model_shape(source: Path | str, trust_remote_code: bool = False, task: str = "causal_lm",
                num_labels: int = 2, audio_s: float | None = None) -> ModelShape:
    """Count parameters from the config alone: the task's model is built on the meta device (no memory,
    no weights). `audio_s`: a speech encoder's longest clip, where its frames are not fixed."""
    import torch
    from transformers import AutoConfig

    from sft_dist.modeling.loss import why_not_chunked

    head = {"num_labels": num_labels} if TASKS[task].has_new_head else {}
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code, **head)
    except OSError as err:
        raise UserError(f"cannot read the model's config from {source} ({err}); pass --model-config DIR "
                        "(a folder with the model's config.json)", key="model.name_or_path") from None
    with torch.device("meta"):
        model = TASKS[task].auto_model().from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # Convolutional vision models have no transformer layers: their activations are not estimated.
    layers = [getattr(text, name, 0) for name in ("hidden_size", "num_hidden_layers", "num_attention_heads")]
    vocab = num_labels if TASKS[task].has_new_head else text.vocab_size
    if TASKS[task].reads_audio:
        frames, targets = audio_positions(config, audio_s)
        return ModelShape(total, largest, *layers, vocab, frames, getattr(config, "decoder_layers", 0) if targets
                          else 0, targets)
    return ModelShape(total, largest, *layers, vocab, image_positions(config),
                      chunkable=task == "causal_lm" and why_not_chunked(model) is None)


def image_positions(config: Any) -> int | None:
    """A vision transformer's sequence: one position per patch, plus [CLS]; None for text models."""
    size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int):
        return None
    return (size // patch) ** 2 + 1


ASSUMED_AUDIO_S = 30.0  # a wav2vec2-style encoder's clip when data.max_audio_s is unset: Whisper's window
ENCODER_SAMPLING_RATE = 16_000  # what wav2vec2, HuBERT and WavLM take


def audio_positions(config: Any, audio_s: float | None) -> tuple[int | None, int | None]:
    """(encoder frames, decoder target tokens or None) of a speech model; (None, None) if not known."""
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "max_source_positions", None):
        return config.max_source_positions, config.max_target_positions  # Whisper: the padded window
    strides = getattr(config, "conv_stride", None)
    if strides:
        samples = (audio_s or ASSUMED_AUDIO_S) * ENCODER_SAMPLING_RATE
        return math.ceil(samples / math.prod(strides)), None
    return None, None


# ---------------------------------------------------------------- the report


def parse_bytes(text: str) -> int:
    """`80GB`, `80GiB`, `24G`, `512MB`: GB counted as GiB, as nvidia-smi and DeepSpeed's estimators do."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise UserError(f"--device-memory: expected a size such as 80GB, got {text!r}")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def rows(cfg: RunConfig, shape: ModelShape, gpus_per_node: int) -> list[dict[str, Any]]:
    t, world = cfg.train, cfg.ray.min_workers  # the fewest workers hold the most per device
    eager = cfg.model.attn_implementation == "eager"
    seq_len = shape.positions or cfg.data.max_seq_len
    chunk = loss_chunk(cfg, shape)
    act = {gc: activation_bytes(shape, t.micro_batch_size, seq_len, t.precision, eager, gc, chunk)
           for gc in (False, True)}
    out = []
    for setting in settings():
        states = model_state_bytes(shape.total_params, shape.largest_layer_params, setting, t.precision, world)
        model_states = sum(states.values())
        out.append({"setting": setting, **states, "model_states": model_states,
                    "activations": act[False], "activations_checkpointed": act[True],
                    "total": model_states + act[False], "total_checkpointed": model_states + act[True],
                    "host_per_node": host_bytes_per_node(shape.total_params, shape.largest_layer_params, setting,
                                                         world, gpus_per_node)})
    return out


def loss_chunk(cfg: RunConfig, shape: ModelShape) -> int | None:
    """The chunked loss's tokens per chunk where the run uses it, else None (the full logits)."""
    switch = cfg.train.chunked_loss
    on = switch is True or (switch == "auto" and shape.chunkable)
    return cfg.train.loss_chunk_tokens if on and cfg.model.task == "causal_lm" else None


def recommend(table: list[dict[str, Any]], device_bytes: int) -> tuple[dict[str, Any], bool] | None:
    """The cheapest (row, gradient checkpointing) that fits: no offload before offload, then without
    checkpointing (about a third more compute) before with it, then the lowest stage."""
    usable = device_bytes * (1 - HEADROOM)
    for offloaded in (False, True):
        for checkpointing in (False, True):
            for row in table:
                s = row["setting"]
                if (s.offload_optimizer or s.offload_params) != offloaded:
                    continue
                if row["total_checkpointed" if checkpointing else "total"] <= usable:
                    return row, checkpointing
    return None


def report(cfg: RunConfig, shape: ModelShape, device_bytes: int | None, gpus_per_node: int,
           measured: tuple[dict[int, float], str] | None = None) -> str:
    t, ds = cfg.train, cfg.deepspeed
    table, chunk = rows(cfg, shape, gpus_per_node), loss_chunk(cfg, shape)
    gib = lambda n: f"{n / GiB:8.2f}"  # noqa: E731
    lines = [
        f"model: {cfg.model.name_or_path}: {shape.total_params / 1e9:.3f} B parameters "
        f"({shape.total_params:,}; largest layer {shape.largest_layer_params:,}), {layers_text(shape)}, "
        f"hidden {shape.hidden}, {'labels' if task_of(cfg).has_new_head else 'vocab'} {shape.vocab}",
        f"run: {cfg.ray.num_workers_text()} workers, {t.precision}, micro-batch {t.micro_batch_size} x "
        f"{sequence_text(cfg, shape)}, configured ZeRO-{ds.stage}"
        + (" offload optimizer" if ds.offload_optimizer else "") + (" offload params" if ds.offload_params else "")
        + (", gradient checkpointing" if cfg.model.gradient_checkpointing else "")
        + (f", chunked loss ({chunk} tokens a chunk)" if chunk else ""),
        "",
        "memory per device, GiB (model states: DeepSpeed's estimates; activations: Korthikanti et al. 2022)",
        f"{'setting':<33}{'params':>8} {'grads':>8} {'optim':>8} {'layer':>8} {'states':>8} "
        f"{'+act':>8} {'+act gc':>8} {'host/node':>10}",
    ]
    configured = Setting(ds.stage, ds.offload_optimizer, ds.offload_params)
    for row in table:
        mark = "*" if row["setting"] == configured else " "
        lines.append(f"{mark}{row['setting'].label():<32}{gib(row['params'])} {gib(row['grads'])} "
                     f"{gib(row['optimizer'])} {gib(row['gathered_layer'])} {gib(row['model_states'])} "
                     f"{gib(row['total'])} {gib(row['total_checkpointed'])} {gib(row['host_per_node']):>10}")
    lines += ["* the configured setting; layer: ZeRO-3's gathered layer; +act: with activations "
              "(gc: gradient checkpointing); host/node: host RAM per node"]
    if cfg.peft.method != "none":
        lines.append(f"note: peft.method {cfg.peft.method}: the figures are for full fine-tuning, an upper bound")
    if device_bytes is not None:
        lines.append("")
        found = recommend(table, device_bytes)
        budget = f"{device_bytes / GiB:.0f} GiB per device ({HEADROOM:.0%} kept free)"
        if found is None:
            lines.append(f"recommendation: nothing fits {budget}; use more workers, a shorter "
                         f"data.max_seq_len or a smaller train.micro_batch_size")
        else:
            row, gc = found
            s = row["setting"]
            need = row["total_checkpointed" if gc else "total"]
            lines.append(
                f"recommendation: {s.label()}{' with' if gc else ' without'} gradient checkpointing: "
                f"{need / GiB:.1f} GiB of {budget}: deepspeed.stage: {s.stage}, deepspeed.offload_optimizer: "
                f"{str(s.offload_optimizer).lower()}, deepspeed.offload_params: {str(s.offload_params).lower()}, "
                f"model.gradient_checkpointing: {str(gc).lower()}")
            cpu_workers = 0 if cfg.ray.use_gpu else cfg.ray.max_workers
            lines += plan_speed.advice(ds.stage, ds.offload_optimizer or ds.offload_params, s.stage, cpu_workers,
                                       cfg.ray.threads_per_worker, measured)
    return "\n".join(lines)


def layers_text(shape: ModelShape) -> str:
    if shape.decoder_layers and shape.decoder_positions:
        return f"{shape.layers} encoder + {shape.decoder_layers} decoder layers"
    return f"{shape.layers} layers"


def sequence_text(cfg: RunConfig, shape: ModelShape) -> str:
    """What one row of the micro-batch is: tokens, an image's patches, or a clip's frames."""
    if not shape.positions:
        return f"{cfg.data.max_seq_len} tokens"
    if not task_of(cfg).reads_audio:
        return f"{shape.positions} patches"
    text = f"{shape.positions} audio frames"
    if shape.decoder_positions:
        return text + f" + {shape.decoder_positions} target tokens"
    return text + (f" ({cfg.data.max_audio_s:g} s clips)" if cfg.data.max_audio_s else
                   f" ({ASSUMED_AUDIO_S:g} s clips assumed: set data.max_audio_s)")


def plan(config_path: str, overrides: list[str], device_memory: str | None, model_config: str | None,
         gpus_per_node: int | None, bench: str | None = None) -> str:
    from sft_dist import config as config_lib

    cfg = config_lib.load(config_path, overrides)
    device_bytes = parse_bytes(device_memory) if device_memory else None
    # A classifier's label count from the config (2 if the data names them: the head is a rounding error).
    num_labels = len(cfg.model.labels) if cfg.model.labels else cfg.model.num_labels or 2
    shape = model_shape(model_config_folder(cfg, Path(config_path), model_config), cfg.model.trust_remote_code,
                        cfg.model.task, num_labels, cfg.data.max_audio_s)
    return report(cfg, shape, device_bytes, gpus_per_node or min(cfg.ray.max_workers, 8),
                  plan_speed.bench_step_ratios(bench) if device_bytes else None)
