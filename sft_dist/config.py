"""The run configuration: typed, frozen pydantic models of the YAML, loading, `--set` overrides and
cross-field checks. Nothing else in sft_dist parses YAML. Imports no torch, Ray or DeepSpeed.

Every section forbids unknown keys, so a typo is an error naming the dotted key and the file line,
never a silent default downstream.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sft_dist.errors import UserError
from sft_dist.local_paths import first_problem, is_local_source
from sft_dist.storage import Location
from sft_dist.tasks import FORMAT_TASKS, TASKS


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` (YAML's spellings) in any float key is an error, not a run
    # that diverges at step 1 and still ends "completed".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def first_non_finite(value: Any, key: str) -> str | None:
    """The dotted key of the first inf/NaN inside a free-form mapping (passed to a library as given)."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for k, v in items if (found := first_non_finite(v, f"{key}.{k}"))), None)


class ModelConfig(Section):
    name_or_path: str
    gguf_file: str | None = None
    task: Literal[tuple(TASKS)] = "causal_lm"  # type: ignore[valid-type]
    # "auto" follows train.precision; DeepSpeed keeps fp32 master weights either way.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    dropout: float | None = Field(None, ge=0, lt=1)  # overrides every *dropout* probability of the model config
    trust_remote_code: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    # A vision-language model's vision tower kept as it is (not trained); with LoRA, the adapters' own
    # targets decide (peft.modules_to_save: [vision_tower] trains the tower in full beside them).
    freeze_vision: bool = False

    # Classification heads: the label names (their order gives the ids), else only their number; when
    # neither is set the names come from the training data (sft_dist.data.labels).
    num_labels: int | None = Field(None, gt=1)
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _labels_match_their_number(self) -> ModelConfig:
        if self.labels is not None and (len(set(self.labels)) != len(self.labels) or len(self.labels) < 2):
            raise ValueError("model.labels: needs two or more distinct label names")
        if self.labels is not None and self.num_labels is not None and self.num_labels != len(self.labels):
            raise ValueError(f"model.num_labels: {self.num_labels} but model.labels names {len(self.labels)}; "
                             "set one of them")
        return self


class PeftConfig(Section):
    # none; lora; qlora (LoRA on a base loaded in 4 bits, bitsandbytes NF4, GPU workers only); or the
    # name of another peft method that adds adapters to `target_modules` (peft's PeftType in lower case:
    # loha, lokr, ia3, vera, oft, boft, adalora, ...), checked against the installed peft before Ray starts.
    method: str = Field("none", pattern=r"^[a-z0-9_]+$")
    # LoRA's own settings (lora, qlora); another method takes its settings from `options`.
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    use_dora: bool = False  # weight-decomposed LoRA (DoRA)
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r (rank-stabilized LoRA)
    # Every method: where the adapters go, and modules trained in full and saved with the adapter
    # (e.g. a new head or resized embeddings).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)
    # More fields of peft's config class for the method, passed as given: e.g. {layers_to_transform: [3]}
    # for lora, {r: 8, alpha: 8} for loha, {feedforward_modules: [down_proj]} for ia3.
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _lora_keys_only_for_lora(self) -> PeftConfig:
        if self.method in ("none", "lora", "qlora"):
            return self
        defaults = PeftConfig.model_construct()
        for key in LORA_ONLY_KEYS:
            if getattr(self, key) != getattr(defaults, key):
                raise ValueError(f"peft.{key} is LoRA's; for peft.method {self.method} give the method's own "
                                 f"fields under peft.options (e.g. peft.options.{key})")
        return self

    @model_validator(mode="after")
    def _options_do_not_repeat_keys(self) -> PeftConfig:
        typed = {"task_type", "target_modules", "modules_to_save"}
        if self.method in ("lora", "qlora"):
            typed |= {"r", "lora_alpha", "lora_dropout", *LORA_ONLY_KEYS}
        repeated = sorted(typed & set(self.options))
        if repeated:
            raise ValueError(f"peft.options.{repeated[0]}: set by sft_dist (task_type from model.task) or by its "
                             f"own key (peft.target_modules, peft.r, peft.alpha, ...); remove it from options")
        return self


LORA_ONLY_KEYS = ("r", "alpha", "dropout", "use_dora", "use_rslora")


# The canonical field names of each data.format (each task's own); data.fields maps them to a dataset's
# own column names.
FORMAT_FIELDS = {fmt: fields for task in TASKS.values() for fmt, fields in task.formats.items()}
ROLES = ("system", "user", "assistant", "tool")
ROLE_TARGETS = (*ROLES, "function_call")  # data.roles may name a dataset's tool-call turns (ShareGPT's)
CHAT_AND_TEXT_FORMATS = tuple(TASKS["causal_lm"].formats)  # what a source may set as its own format


class SourceConfig(Section):
    """One data source: a local file, glob or folder (data files or `save_to_disk`), or a hub dataset name."""

    path: str
    # A multiplier: each row counts `weight` times per epoch (2: twice; 0.5: a fixed half of the rows).
    weight: float = Field(1.0, gt=0)
    config: str | None = None  # hub dataset configuration (subset)
    split: str = "train"  # hub dataset or DatasetDict split
    # This source's own data.format, data.fields and data.roles (None: the data section's), so that an
    # alpaca file and a ShareGPT file train together. Chat and text formats only.
    format: Literal[CHAT_AND_TEXT_FORMATS] | None = None  # type: ignore[valid-type]
    fields: dict[str, str] | None = None
    roles: dict[str, str] | None = None
    # How a .txt file splits into rows (a `text` column): each line, each blank-line-separated
    # paragraph, or the whole file (datasets' text loader's sample_by).
    sample_by: Literal["line", "paragraph", "document"] = "line"

    def resolved(self) -> SourceConfig:
        if not is_local_source(self.path):
            return self
        return self.model_copy(update={"path": str(Path(self.path).expanduser().resolve())})


# A source is written as a plain path or as a mapping. The tags name the union members the way
# config._user_error already drops from error locations, so a bad key reads `data.train.0.weight`.
SourceEntry = Annotated[
    Annotated[str, Tag("str")] | Annotated[SourceConfig, Tag("dict[source]")],
    Discriminator(lambda v: "str" if isinstance(v, str) else "dict[source]"),
]
EvalEntry = Annotated[
    Annotated[float, Tag("float")] | Annotated[list[SourceEntry], Tag("list[sources]")],
    Discriminator(lambda v: "float" if isinstance(v, (int, float)) and not isinstance(v, bool) else "list[sources]"),
]


class ImageAugmentConfig(Section):
    """Training-only image augmentation, applied before the model's image processor, drawn from
    (seed, step, row): the same images on every rerun, none in validation."""

    horizontal_flip: bool = True  # mirror half of the images left-right
    # Random resized crop (torchvision's RandomResizedCrop): a crop of this fraction of the area, with
    # an aspect ratio between 3/4 and 4/3, resized back; null: no cropping.
    crop_scale: tuple[float, float] | None = (0.6, 1.0)

    @field_validator("crop_scale")
    @classmethod
    def _scale_is_a_range(cls, scale: tuple[float, float] | None) -> tuple[float, float] | None:
        if scale is not None and not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(scale)}")
        return scale


class AudioAugmentConfig(Section):
    """Training-only audio augmentation, applied before the model's feature extractor, drawn from
    (seed, step, row): the same clips on every rerun, none in validation. null turns one off."""

    gain_db: float | None = Field(6.0, ge=0)  # a gain drawn in [-gain_db, +gain_db] dB
    # A speed factor drawn in [low, high] (Kaldi's speed perturbation: tempo and pitch together).
    speed: tuple[float, float] | None = (0.9, 1.1)
    noise_snr_db: tuple[float, float] | None = (20.0, 40.0)  # white noise at an SNR drawn in [low, high] dB

    @field_validator("speed")
    @classmethod
    def _speed_is_a_range(cls, speed: tuple[float, float] | None) -> tuple[float, float] | None:
        if speed is not None and not 0 < speed[0] <= speed[1]:
            raise ValueError(f"speed must be [low, high] with 0 < low <= high, got {list(speed)}")
        return speed

    @field_validator("noise_snr_db")
    @classmethod
    def _snr_is_a_range(cls, snr: tuple[float, float] | None) -> tuple[float, float] | None:
        if snr is not None and not snr[0] <= snr[1]:
            raise ValueError(f"noise_snr_db must be [low, high] with low <= high, got {list(snr)}")
        return snr


class DataConfig(Section):
    train: list[SourceEntry]
    # Sources, or a fraction (0-1) of the training rows held out (chosen by content, the same every run).
    eval: EvalEntry | None = None
    format: Literal[tuple(FORMAT_FIELDS)] = "messages"  # type: ignore[valid-type]
    fields: dict[str, str] = Field(default_factory=dict)  # canonical field name -> the dataset's column
    roles: dict[str, str] = Field(default_factory=dict)  # the dataset's role names -> system/user/assistant
    chat_template: str | None = None  # a named template, Jinja text or a .jinja file; else the tokenizer's
    max_seq_len: int = Field(1024, gt=0)
    # right: cut the end; left: cut the start (the prompt), keeping the answer; drop: skip the row.
    # (data.format text with packing: a long document is cut into max_seq_len windows instead)
    truncation: Literal["right", "left", "drop"] = "right"
    # assistant: every assistant turn; last_assistant: only the last one (earlier ones are context); all
    loss_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    packing: bool = False
    group_by_length: bool = False
    on_bad_row: Literal["error", "skip"] = "error"
    streaming: bool = False
    num_proc: int | None = Field(None, gt=0)  # tokenizing processes; default: by data size and CPUs
    # token_classification: label every sub-token of a word with its tag, not only the first one.
    label_all_subtokens: bool = False
    image_augment: ImageAugmentConfig | None = None  # image_classification only
    audio_augment: AudioAugmentConfig | None = None  # speech_recognition and audio_classification only
    # The longest clip trained or validated, in seconds (the audio tasks): longer ones are skipped and
    # counted as too_long, as data.max_seq_len bounds text. Whisper's window bounds it already.
    max_audio_s: float | None = Field(None, gt=0)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _listify(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (str, dict)):
            return [value]
        fraction_ok = info.field_name == "eval" and isinstance(value, (int, float))
        if value is not None and not isinstance(value, list) and not fraction_ok:
            raise ValueError("expected a path, a {path, weight, config, split} mapping, or a list of them")
        return value

    def for_source(self, source: SourceConfig) -> DataConfig:
        """The data section as one source reads it: its own format, fields and roles where it sets them."""
        own = {key: getattr(source, key) for key in ("format", "fields", "roles") if getattr(source, key) is not None}
        if "format" in own and "fields" not in own:
            own["fields"] = {}  # the section's fields name another format's columns
        return self.model_copy(update=own) if own else self

    def train_sources(self) -> list[SourceConfig]:
        return [SourceConfig(path=s) if isinstance(s, str) else s for s in self.train]

    def eval_sources(self) -> list[SourceConfig]:
        if not isinstance(self.eval, list):
            return []
        return [SourceConfig(path=s) if isinstance(s, str) else s for s in self.eval]

    def eval_fraction(self) -> float | None:
        return self.eval if isinstance(self.eval, float) else None

    def resolved(self) -> DataConfig:
        """Local source paths made absolute; plain paths stay plain strings."""
        def absolute(entry: str | SourceConfig) -> str | SourceConfig:
            if isinstance(entry, str):
                return SourceConfig(path=entry).resolved().path
            return entry.resolved()

        eval_ = [absolute(s) for s in self.eval] if isinstance(self.eval, list) else self.eval
        return self.model_copy(update={"train": [absolute(s) for s in self.train], "eval": eval_})

    @model_validator(mode="after")
    def _eval_fraction_in_range(self) -> DataConfig:
        fraction = self.eval_fraction()
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(f"data.eval: a held-out fraction must be between 0 and 1, got {fraction}")
        return self

    @model_validator(mode="after")
    def _eval_sources_unweighted(self) -> DataConfig:
        if any(s.weight != 1 for s in self.eval_sources()):
            raise ValueError("data.eval: mixing weights apply to training sources only; remove weight")
        return self

    @model_validator(mode="after")
    def _fields_belong_to_format(self) -> DataConfig:
        for where, data in self._per_source():
            unknown = sorted(set(data.fields) - set(FORMAT_FIELDS[data.format]))
            if unknown:
                raise ValueError(f"{where}fields: {', '.join(unknown)} is not a field of format {data.format} "
                                 f"(its fields: {', '.join(FORMAT_FIELDS[data.format])})")
        return self

    @model_validator(mode="after")
    def _roles_map_to_known_roles(self) -> DataConfig:
        for where, data in self._per_source():
            wrong = sorted(v for v in data.roles.values() if v not in ROLE_TARGETS)
            if wrong:
                raise ValueError(f"{where}roles: maps to {', '.join(wrong)}; map each dataset role to one of "
                                 f"{ROLE_TARGETS}")
        return self

    @model_validator(mode="after")
    def _source_formats_are_chat_or_text(self) -> DataConfig:
        if self.format not in CHAT_AND_TEXT_FORMATS and any(s.format for s in self.train_sources()):
            raise ValueError(f"data.train: a source's own format is for chat and text data; data.format "
                             f"{self.format} reads every source the same way")
        return self

    def _per_source(self) -> list[tuple[str, DataConfig]]:
        """(where, the section as the source reads it): the section itself, then each source that sets its own."""
        found = [("data.", self)]
        for split, sources in (("train", self.train_sources()), ("eval", self.eval_sources())):
            found += [(f"data.{split}.{i}.", self.for_source(s)) for i, s in enumerate(sources)
                      if s.format or s.fields is not None or s.roles is not None]
        return found

    @model_validator(mode="after")
    def _media_keys_need_their_media(self) -> DataConfig:
        if self.image_augment is not None and TASKS[FORMAT_TASKS[self.format]].preprocessor != "image_processor":
            raise ValueError(f"data.image_augment: augments images; data.format {self.format} has none")
        for key in ("audio_augment", "max_audio_s"):
            if getattr(self, key) is not None and not TASKS[FORMAT_TASKS[self.format]].reads_audio:
                raise ValueError(f"data.{key}: for audio; data.format {self.format} has none")
        return self

    @model_validator(mode="after")
    def _grouping_needs_unpacked_rows(self) -> DataConfig:
        if self.group_by_length and self.packing:
            raise ValueError("data.group_by_length: packed rows are all about data.max_seq_len long, so grouping "
                             "them by length does nothing; set data.packing or data.group_by_length to false")
        return self


# transformers.get_scheduler names; scheduler-specific arguments go in train.scheduler_kwargs (e.g.
# num_cycles for cosine_with_restarts, num_decay_steps for warmup_stable_decay: default a tenth of the run).
# `exponential` is ours: from train.lr to scheduler_kwargs.end_lr geometrically over the run (the sweep
# of `sft-dist lr-find`).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "warmup_stable_decay", "cosine_with_min_lr", "exponential")


class TrainConfig(Section):
    max_steps: int | None = Field(None, gt=0)
    epochs: int = Field(1, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    # micro_batch_size x grad_accum x workers (MAX workers for an elastic run): checked against
    # grad_accum when both are given, else grad_accum is derived from it. An elastic run keeps it at
    # every world size (sft_dist.config.RunConfig.grad_accum_at).
    global_batch_size: int | None = Field(None, gt=0)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int | None = Field(None, ge=0)  # instead of warmup_ratio
    scheduler: Literal[SCHEDULERS] = "linear"  # type: ignore[valid-type]
    scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    # Discriminative learning rates: block i of L gets lr x decay^(L-1-i), the embeddings decay^L; then
    # the first `lr_overrides` regular expression that matches a parameter's name sets its lr outright.
    layerwise_lr_decay: float | None = Field(None, gt=0, le=1)
    lr_overrides: dict[str, float] = Field(default_factory=dict)
    # Regularisation: NEFTune noise on the input embeddings while training; label smoothing of the
    # training loss (validation reports the plain loss).
    neftune_alpha: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Classification tasks: a weight per label (in label id order) in the cross-entropy, for imbalance.
    class_weights: list[float] | None = None
    # Causal LM: the loss over the LM head in chunks of `loss_chunk_tokens` supervised tokens, never holding
    # the full logits or their gradient (same values and gradients). auto: on where exact for the model.
    # Off by default: each chunk's logits are recomputed in the backward, 1.18x the step time where the
    # head is most of the compute (sft-dist bench, line 8b); memory is the reason to turn it on.
    chunked_loss: bool | Literal["auto"] = False
    loss_chunk_tokens: int = Field(1024, gt=0)

    @field_validator("class_weights")
    @classmethod
    def _weights_positive(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and (not weights or any(w <= 0 for w in weights)):
            raise ValueError("class weights must be positive numbers, one per label")
        return weights

    @model_validator(mode="after")
    def _exponential_has_an_end(self) -> TrainConfig:
        if self.scheduler == "exponential" and not self.scheduler_kwargs.get("end_lr"):
            raise ValueError("train.scheduler_kwargs: the exponential schedule needs end_lr")
        return self

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_ratio:
            raise ValueError("train.warmup_steps: set it or train.warmup_ratio, not both")
        return self

    @field_validator("lr_overrides")
    @classmethod
    def _patterns_compile(cls, overrides: dict[str, float]) -> dict[str, float]:
        for pattern, lr in overrides.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a regular expression ({err})") from None
            if lr <= 0:
                raise ValueError(f"{pattern!r}: the learning rate must be positive, got {lr}")
        return overrides

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * total_steps)


class DeepSpeedConfig(Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError("deepspeed.offload_params: needs deepspeed.stage: 3")
        return self

    @model_validator(mode="after")
    def _offload_optimizer_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs deepspeed.stage 1, 2 or 3")
        return self


class GenerateConfig(Section):
    """Greedy answers to held-out prompts, scored by exact match and by `match`."""

    num_prompts: int = Field(4, gt=0)
    max_new_tokens: int | None = Field(None, gt=0)  # None: from the held-out answers' lengths, plus a margin
    # exact: answer == expected; contains: expected occurs in the answer; regex: `pattern`'s first group
    # (or whole match) in the answer equals expected, or without a pattern expected is a regex the answer
    # must match in full; json: both parse as JSON and are equal.
    match: Literal["exact", "contains", "regex", "json"] = "exact"
    pattern: str | None = None

    @model_validator(mode="after")
    def _pattern_compiles(self) -> GenerateConfig:
        if self.pattern is not None:
            if self.match != "regex":
                raise ValueError("eval.generate.pattern: only used with eval.generate.match: regex")
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"eval.generate.pattern: not a valid regular expression ({err})") from None
        return self


class EarlyStoppingConfig(Section):
    """Stop when `eval.metric` has not improved by more than `min_delta` for `patience` validations."""

    patience: int = Field(gt=0)
    min_delta: float = Field(0.0, ge=0)


# Every task's validation metrics, and whether lower or higher is better.
METRIC_DIRECTIONS = {name: side for task in TASKS.values() for name, side in task.metrics.items()}
EVAL_METRICS = tuple(METRIC_DIRECTIONS)


class EvalConfig(Section):
    every_steps: int | None = Field(None, gt=0)
    at_start: bool = True
    at_epoch_end: bool = False
    at_end: bool = True
    micro_batch_size: int | None = Field(None, gt=0)
    generate: GenerateConfig | None = None
    # The validation metric: it picks the best checkpoint and drives early stopping.
    metric: Literal[EVAL_METRICS] = "eval_loss"  # type: ignore[valid-type]
    mode: Literal["min", "max"] | None = None  # default: min for eval_loss / eval_ppl, else max
    early_stopping: EarlyStoppingConfig | None = None
    # A validation (or generation) pass that runs longer fails the run, naming the phase, instead of
    # leaving the other ranks waiting in a collective until the process-group timeout.
    timeout_s: float | None = Field(None, gt=0)

    def direction(self) -> Literal["min", "max"]:
        return self.mode or METRIC_DIRECTIONS[self.metric]

    @model_validator(mode="after")
    def _generation_metric_needs_generation(self) -> EvalConfig:
        if self.metric in ("eval_exact_match", "eval_match") and self.generate is None:
            raise ValueError(f"eval.metric: {self.metric} comes from generation; set eval.generate")
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_periodic_validation(self) -> EvalConfig:
        if self.early_stopping and not (self.every_steps or self.at_epoch_end):
            raise ValueError("eval.early_stopping: needs periodic validation (eval.every_steps or eval.at_epoch_end)")
        return self


class CheckpointConfig(Section):
    # A checkpoint is also saved at the end of training whenever every_steps is set.
    every_steps: int | None = Field(None, gt=0)
    keep: int = Field(2, gt=0)
    export_at_end: bool = False  # write the final checkpoint as a Hugging Face folder, {run}/model

    @model_validator(mode="after")
    def _export_needs_checkpoints(self) -> CheckpointConfig:
        if self.export_at_end and self.every_steps is None:
            raise ValueError("checkpoint.export_at_end: needs checkpoint.every_steps (there is nothing to export)")
        return self


class HangAt(Section):
    """Where `debug.hang_in_validation` blocks: one rank, in the validation at one step (0: at the start)."""

    step: int = Field(ge=0)
    rank: int = Field(0, ge=0)


class DebugConfig(Section):
    """Testing aids: make one rank fail once, at a step, to exercise recovery; or block one rank in a
    validation, to exercise eval.timeout_s."""

    fail_at_step: int | None = Field(None, gt=0)
    fail_rank: int = Field(0, ge=0)
    fail_mode: Literal["raise", "exit"] = "raise"
    hang_in_validation: HangAt | None = None
    # Seconds every rank sleeps after each step: paces a short run so a drill can act on it mid-way
    # (stop a node and start it again); the numbers are unchanged.
    step_sleep_s: float = Field(0.0, ge=0)
    # While this file exists, every rank waits after each step (at most HOLD_LIMIT_S in all): a drill
    # holds a run while a node starts, so a slow machine cannot end the run before it grows. A path that
    # every rank sees (the drills' one-machine cluster); the numbers are unchanged.
    hold_while_file: str | None = None


class RayConfig(Section):
    # A number, or [MIN, MAX]: an elastic run starts with as many workers as the cluster holds (at
    # least MIN), goes on with fewer when a worker or node is lost (after ray.max_failures), and grows
    # back to MAX when capacity returns (Ray Train's elastic ScalingConfig).
    num_workers: int | tuple[int, int] = 2
    # Elastic runs: how often Ray looks for capacity to grow into (ScalingConfig's
    # elastic_resize_monitor_interval_s), and how long a start, or a run that lost nodes, waits for MIN
    # workers' worth of the cluster before it stops.
    resize_interval_s: float = Field(60.0, gt=0)
    min_workers_timeout_s: float = Field(300.0, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    address: str | None = None
    max_failures: int = Field(0, ge=0)
    storage_path: str | None = None
    # The user's word that a local storage_path is the same shared folder (NFS, EFS...) on every node.
    shared_storage: bool = False
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Intra-op threads per worker: on CPU workers more threads than cores only adds contention.
    threads_per_worker: int = Field(1, gt=0)

    @field_validator("num_workers")
    @classmethod
    def _workers_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 0 < low <= high:
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"expected a positive number of workers or [MIN, MAX] with 0 < MIN <= MAX, got {shown}")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def world_sizes(self) -> range:
        return range(self.min_workers, self.max_workers + 1)

    def num_workers_text(self) -> str:
        return f"[{self.min_workers}, {self.max_workers}]" if self.elastic else str(self.num_workers)


class LoggingConfig(Section):
    every_steps: int = Field(1, gt=0)
    tensorboard: bool = False  # event files in {run folder}/tensorboard
    mlflow: str | None = None  # a tracking URI, or a local folder (a file store)
    wandb: str | None = None  # a Weights & Biases project
    # Per-step time in data, forward, backward, optimizer step and DeepSpeed's communication (it syncs
    # the device at each phase, so it slows GPU runs a little: on demand only).
    timing: bool = False


class RunConfig(Section):
    run_name: str | None = None
    output_dir: str = "runs"
    seed: int = 42
    model: ModelConfig
    peft: PeftConfig = PeftConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    ray: RayConfig = RayConfig()
    logging: LoggingConfig = LoggingConfig()
    debug: DebugConfig = DebugConfig()

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_folder_name(cls, name: str | None) -> str | None:
        if name is not None and (not name or "/" in name or name.startswith(".")):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return name

    @model_validator(mode="after")
    def _free_form_numbers_finite(self) -> RunConfig:
        for key, value in (("train.scheduler_kwargs", self.train.scheduler_kwargs),
                           ("deepspeed.extra", self.deepspeed.extra), ("peft.options", self.peft.options)):
            found = first_non_finite(value, key)
            if found:
                raise ValueError(f"{found}: must be a finite number (inf and nan are refused)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _grad_accum_from_global_batch(cls, raw: Any) -> Any:
        """train.global_batch_size without train.grad_accum: the accumulation at ray.num_workers (its MAX)
        that keeps it, written into the config, so a saved config says what the run did."""
        train, ray_ = (raw.get(k) if isinstance(raw, dict) else None for k in ("train", "ray"))
        # A null grad_accum (`--set train.grad_accum=`) is left out too.
        if not isinstance(train, dict) or train.get("grad_accum") is not None or "global_batch_size" not in train:
            return raw
        workers = (ray_ or {}).get("num_workers", 2) if isinstance(ray_, dict) or ray_ is None else None
        workers = workers[-1] if isinstance(workers, (list, tuple)) and workers else workers
        global_batch, micro = train.get("global_batch_size"), train.get("micro_batch_size", 1)
        if all(isinstance(n, int) and n > 0 for n in (workers, global_batch, micro)) \
                and global_batch % (micro * workers) == 0:
            return {**raw, "train": {**train, "grad_accum": global_batch // (micro * workers)}}
        # Not derivable: the checks below say why, naming the world sizes that would keep the batch.
        return {**raw, "train": {k: v for k, v in train.items() if k != "grad_accum"}}

    @model_validator(mode="after")
    def _global_batch_fits_every_world_size(self) -> RunConfig:
        t, global_batch = self.train, self.train.global_batch_size
        if global_batch is None or not self.ray.elastic:
            global_batch = t.micro_batch_size * t.grad_accum * self.ray.max_workers
        unfit = [w for w in self.ray.world_sizes() if global_batch % (t.micro_batch_size * w)]
        if unfit:
            fit = [w for w in range(1, global_batch // t.micro_batch_size + 1)
                   if global_batch % (t.micro_batch_size * w) == 0]
            raise ValueError(
                f"ray.num_workers: {self.ray.num_workers_text()} includes {', '.join(map(str, unfit))} worker(s), "
                f"which cannot keep train.global_batch_size {global_batch} (train.micro_batch_size "
                f"{t.micro_batch_size} x grad_accum x workers); the world sizes that keep it: "
                f"{', '.join(map(str, fit))}; choose ray.num_workers from these")
        return self

    @model_validator(mode="after")
    def _global_batch_matches(self) -> RunConfig:
        # An elastic run's train.grad_accum is the accumulation at ray.num_workers' MAX.
        t, workers = self.train, self.ray.max_workers
        made = t.micro_batch_size * t.grad_accum * workers
        if t.global_batch_size is not None and t.global_batch_size != made:
            raise ValueError(
                f"train.global_batch_size: {t.global_batch_size} but train.micro_batch_size "
                f"({t.micro_batch_size}) x train.grad_accum ({t.grad_accum}) x ray.num_workers "
                f"({self.ray.num_workers_text()}{', its MAX' if self.ray.elastic else ''}) = {made}; change one of "
                "them so the product matches, or leave train.grad_accum out: it is then derived"
            )
        return self

    def global_batch_size(self) -> int:
        """Examples per optimizer step: the same at every world size of an elastic run."""
        t = self.train
        return t.micro_batch_size * t.grad_accum * self.ray.max_workers

    def grad_accum_at(self, world_size: int) -> int:
        """train.grad_accum at `world_size` workers, keeping the global batch (global = micro x accum x workers)."""
        return self.global_batch_size() // (self.train.micro_batch_size * world_size)

    @model_validator(mode="after")
    def _fp16_needs_gpu(self) -> RunConfig:
        if self.train.precision == "fp16" and not self.ray.use_gpu:
            raise ValueError("train.precision: fp16 needs GPU workers (ray.use_gpu: true); use bf16 or fp32 on CPU")
        return self

    @model_validator(mode="after")
    def _qlora_needs_gpu(self) -> RunConfig:
        if self.peft.method == "qlora" and not self.ray.use_gpu:
            raise ValueError("peft.method: qlora needs GPU workers (ray.use_gpu: true): bitsandbytes 4-bit "
                             "weights run on CUDA only; use peft.method: lora on CPU workers")
        return self

    @model_validator(mode="after")
    def _qlora_below_stage3(self) -> RunConfig:
        # A 4-bit base is not built partitioned (transformers skips ZeRO-3 init for quantized models),
        # so ZeRO-3 would have to partition bitsandbytes' packed tensors: unsupported here.
        if self.peft.method == "qlora" and self.deepspeed.stage == 3:
            raise ValueError("peft.method: qlora works with deepspeed.stage 0, 1 or 2; the frozen 4-bit base "
                             "is small already, so ZeRO-2 is the usual choice")
        return self

    @model_validator(mode="after")
    def _periodic_validation_has_data(self) -> RunConfig:
        e = self.eval
        asked = "eval.early_stopping" if e.early_stopping else "eval.every_steps" if e.every_steps else None
        if asked and self.data.eval is None:
            raise ValueError(f"{asked}: there is no validation data; set data.eval (files, or a held-out fraction)")
        return self

    @model_validator(mode="after")
    def _format_fits_task(self) -> RunConfig:
        task, fmt = TASKS[self.model.task], self.data.format
        if fmt in task.formats:
            return self
        if len(task.formats) == 1:
            raise ValueError(f"data.format: model.task {task.name} trains on data.format: {next(iter(task.formats))}, "
                             f"not {fmt}")
        raise ValueError(f"data.format: {fmt} data needs model.task: {FORMAT_TASKS[fmt]}")

    @model_validator(mode="after")
    def _classification_settings(self) -> RunConfig:
        task = TASKS[self.model.task]
        if self.data.packing and not task.packs:
            raise ValueError(f"data.packing: {task.name} classifies whole examples; set data.packing: false")
        if self.eval.generate is not None and not task.generates:
            raise ValueError(f"eval.generate: {task.name} models do not generate; remove eval.generate")
        if not task.labelled:
            if self.train.class_weights or self.model.labels or self.model.num_labels:
                raise ValueError("train.class_weights: model.labels, model.num_labels and train.class_weights are "
                                 f"for classification tasks, not {task.name}")
            return self
        known = self.model.labels and len(self.model.labels) or self.model.num_labels
        if self.train.class_weights and known and len(self.train.class_weights) != known:
            raise ValueError(f"train.class_weights: {len(self.train.class_weights)} weights for {known} labels")
        return self

    @model_validator(mode="after")
    def _fail_rank_exists(self) -> RunConfig:
        if self.debug.fail_rank >= self.ray.min_workers:
            raise ValueError(f"debug.fail_rank: {self.debug.fail_rank} but there are {self.ray.min_workers} workers")
        return self

    @model_validator(mode="after")
    def _hang_is_bounded(self) -> RunConfig:
        hang = self.debug.hang_in_validation
        if hang and hang.rank >= self.ray.min_workers:
            raise ValueError(f"debug.hang_in_validation.rank: {hang.rank} but there are {self.ray.min_workers} workers")
        if hang and self.eval.timeout_s is None:  # nothing would end the hang: the run would never finish
            raise ValueError("debug.hang_in_validation: needs eval.timeout_s, which ends the hung validation")
        return self

    def run_dir(self) -> Path:
        assert self.run_name, "resolve() names the run"
        return Path(self.output_dir) / self.run_name

    def storage_path(self) -> str:
        return self.ray.storage_path or self.output_dir


# ---------------------------------------------------------------- loading


def load(path: str | os.PathLike, overrides: list[str] = (), name_run: bool = True) -> RunConfig:
    """Read the user's YAML file, apply `--set key=value` overrides, validate, check that the local paths it
    names exist, and resolve them (and, with `name_run`, name an unnamed run after the config file and the
    time). Only this reads the filesystem: a saved config validates anywhere (`RunConfig.model_validate`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config file not found", file=str(path))
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"not valid YAML: {getattr(err, 'problem', err)}", file=str(path),
                        line=mark.line + 1 if mark else None) from None
    if not isinstance(raw, dict):
        raise UserError("the top level must be a mapping of sections", file=str(path))
    from_set = {}
    for item in overrides:
        key = apply_override(raw, item)
        from_set[key] = item
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise _located(*_first_error(err), path, text, from_set) from None
    problem = first_problem(config)
    if problem:
        raise _located(*problem, path, text, from_set)
    return resolve(config, path, name_run)


def apply_override(raw: dict, item: str) -> str:
    """Apply one `a.b.c=value` to the raw mapping; the value is parsed as YAML (so 3 is an int)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects KEY=VALUE, got {item!r}")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"cannot set a key inside a {type(child).__name__}", key=key)
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        node[parts[-1]] = value
    return key


def resolve(config: RunConfig, config_path: Path, name_run: bool = True) -> RunConfig:
    """Make local paths absolute, and name an unnamed run (config stem + time) if asked."""
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    data = config.data
    updates: dict[str, Any] = {
        "run_name": config.run_name or (f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}" if name_run else None),
        "output_dir": absolute(config.output_dir),
        "data": data.resolved(),
    }
    if Path(config.model.name_or_path).expanduser().is_dir():
        updates["model"] = config.model.model_copy(update={"name_or_path": absolute(config.model.name_or_path)})
    if config.ray.storage_path and not Location.of(config.ray.storage_path).is_remote:
        updates["ray"] = config.ray.model_copy(update={"storage_path": absolute(config.ray.storage_path)})
    return config.model_copy(update=updates)


def dump(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _first_error(err: ValidationError) -> tuple[str, str]:
    """(dotted key, message) of the first validation problem."""
    first = err.errors()[0]
    # Union members and validators add their own names to the location: not part of the key.
    loc = [str(p) for p in first["loc"]]
    loc = [p for p in loc if not p.startswith(("function-", "literal", "str", "list[", "int", "dict[", "tuple["))]
    key = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see the config reference in README.md)"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
        message += f" (got {first['input']!r})"
    named = re.match(r"([a-z_]+(?:\.[a-z_]+)+): (.*)", message, re.S)
    if named:  # cross-field rules name their own key first
        key, message = named.groups()
    return key, message


def _located(key: str, message: str, path: Path, text: str, from_set: dict[str, str]) -> UserError:
    """One message naming the file, the key's line (or the `--set` that gave it) and the dotted key."""
    origin = next((from_set[k] for k in from_set if key == k or key.startswith(k + ".")), None)
    if origin:
        message += f" [from --set {origin}]"
    return UserError(message, file=str(path), line=None if origin else _line_of(text, key), key=key or None)


def _line_of(text: str, dotted_key: str) -> int | None:
    """Line number (1-based) of a dotted key in the YAML text, or of its nearest existing parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in dotted_key.split(".") if dotted_key else []:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == part), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line
