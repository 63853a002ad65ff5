"""Speech recognition (speech to text) with an encoder-decoder model (Whisper-style): a clip and its
transcript per row; the loss on the transcript's tokens, validation by word error rate of greedy
transcripts (sft_dist.tasks.speech_metrics)."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task


def transcript_encoder(data: Any, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    from sft_dist.data.audio import recogniser_encoder

    return recogniser_encoder(data, tokenizer)


def transcript_batches(cfg: Any, tokenizer: Any, module: Any) -> Any:
    from sft_dist.data.audio import AudioBatches
    from sft_dist.modeling import model as model_lib

    dtype = next(module.parameters()).dtype  # the features are cast to the model's dtype
    return AudioBatches(model_lib.load_feature_extractor(cfg.model), cfg.data.audio_augment, cfg.seed,
                        tokenizer.pad_token_id, dtype)


def transcript_loss(train: Any) -> Any:
    from sft_dist.tasks.heads import tag_loss_sums

    # The batch maker aligned the decoder's logits with its targets already: no shift here.
    return lambda logits, labels: tag_loss_sums(logits, labels, None, train.label_smoothing)


def transcript_counts(model: Any) -> Any:
    from sft_dist.modeling.model import load_tokenizer
    from sft_dist.tasks.speech_metrics import TranscriptCounts

    return TranscriptCounts(load_tokenizer(model))


TASK = Task(
    name="speech_recognition", auto_class="AutoModelForSpeechSeq2Seq", pipeline="automatic-speech-recognition",
    # A clip (as for audio_classification) and its transcript.
    formats={"speech_recognition": ("audio", "text")},
    metrics={"eval_loss": "min", "eval_token_acc": "max", "eval_wer": "min"},
    encoder=transcript_encoder, batches=transcript_batches, loss=transcript_loss, counts=transcript_counts,
    preprocessor="processor", saves_generation_config=True,
    # peft's SEQ_2_SEQ_LM wrapper passes `input_ids`, which a speech encoder does not take: no task type,
    # adapters on the attention layers (peft.target_modules) and the decoder's head tied to its embeddings.
)
