"""Audio classification (e.g. voice commands): a clip and a label per row; the loss and metrics of text
classification."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task
from sft_dist.tasks.sequence_classification import CLASS_METRICS, class_counts, example_loss, label_config


def clip_encoder(data: Any, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    from sft_dist.data.audio import AudioEncoder

    return AudioEncoder(data, names=labels, max_duration_s=data.max_audio_s)


def clip_batches(cfg: Any, tokenizer: Any, module: Any) -> Any:
    from sft_dist.data.audio import AudioBatches
    from sft_dist.modeling import model as model_lib

    dtype = next(module.parameters()).dtype  # the features are cast to the model's dtype
    return AudioBatches(model_lib.load_feature_extractor(cfg.model), cfg.data.audio_augment, cfg.seed, None, dtype)


TASK = Task(
    name="audio_classification", auto_class="AutoModelForAudioClassification", pipeline="audio-classification",
    # A clip (a wav/flac path, relative to the data file's folder or absolute, the bytes of an audio
    # file, or a `datasets` Audio value) and a label name or id.
    formats={"audio_classification": ("audio", "label")},
    metrics=CLASS_METRICS, encoder=clip_encoder, batches=clip_batches, loss=example_loss, counts=class_counts,
    head_config=label_config, label_field="label", preprocessor="feature_extractor",
    # peft has no audio task type: the new layers of transformers' audio classifiers (wav2vec2, HuBERT,
    # WavLM, Whisper's encoder: a projector, then the classifier) are trained in full next to the adapters.
    head_modules=("projector", "classifier"),
)
