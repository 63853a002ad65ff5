"""Audio for `speech_recognition` and `audio_classification`: on the driver, each row's clip (a path,
relative to its data file's folder or absolute, the bytes of an audio file, or a `datasets` Audio value)
is read, checked to decode and to hold samples, measured, and saved as bytes with its transcript's token
ids or its label id; on the workers, each batch's clips are decoded, resampled to the feature
extractor's rate, augmented (training only) and turned into the model's input features by the model's
own feature extractor. Imports neither Ray nor DeepSpeed.

Decoding is libsndfile's (`soundfile`: WAV, FLAC, OGG/Vorbis, MP3 and more), resampling soxr's (what
librosa uses). Not torchaudio (it needs a torch build of its own) and not `datasets.Audio` decoding
(datasets 5 decodes only through torchcodec, which also pins torch and needs FFmpeg): an Audio column
is read undecoded, as {bytes, path}, and decoded here.

Saved rows keep the layout of the other tasks, so batching plans and the loss are shared:
- classification: `labels` holds the one label id, `length` 1, as for text and images;
- recognition: `input_ids` is the tokenizer's whole target sequence (the decoder prompt, e.g. Whisper's
  <|startoftranscript|><|notimestamps|>, then the transcript and end of text), `labels` the same with
  the prompt masked: the loss is on the transcript's tokens and the end of text only, never on the
  prompt `generate` forces anyway. The batch maker shifts them into decoder inputs and targets.
The clip's bytes travel in an `audio` column and its length in `duration_s` (for throughput in audio
seconds); features are made per batch, not stored (a 30 s Whisper window is 240 KB of floats).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import soundfile
import soxr
import torch

from sft_dist.config import AudioAugmentConfig, DataConfig
from sft_dist.data.badrows import BadRow
from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.data.encode import FEATURES, drop, encode_rows
from sft_dist.data.images import file_bytes, part_folder
from sft_dist.data.labels import LabelEncoder

AUDIO_FEATURES = datasets.Features({**FEATURES, "audio": datasets.Value("binary"),
                                    "duration_s": datasets.Value("float32")})


class AudioEncoder:
    """What `datasets.map` runs over audio rows of one data file (`folder`: where its relative paths start).

    `names`: the label names of a classifier (rows {audio, label}); else `tokenizer` and
    `decoder_start_id` make a recogniser's targets (rows {audio, text}). `max_duration_s`: longer clips
    are dropped as too long (not bad rows), e.g. past a Whisper window, which would cut the speech
    off from its transcript; `max_target_tokens` the same for transcripts past the decoder's length.
    """

    features = AUDIO_FEATURES

    def __init__(self, data: DataConfig, names: list[str] | None = None, tokenizer: Any = None,
                 decoder_start_id: int | None = None, max_duration_s: float | None = None,
                 max_target_tokens: int | None = None, folder: Path | None = None):
        assert (names is None) != (tokenizer is None), "a classifier's label names or a recogniser's tokenizer"
        self.data, self.names, self.tokenizer, self.folder = data, names, tokenizer, folder
        self.decoder_start_id, self.max_duration_s, self.max_target_tokens = (
            decoder_start_id, max_duration_s, max_target_tokens)
        self.labels = LabelEncoder(data, None, names) if names is not None else None
        self.audio_key = data.fields.get("audio", "audio")
        self.target_key = data.fields.get("label", "label") if names is not None else data.fields.get("text", "text")

    def for_part(self, part_name: str) -> AudioEncoder:
        """The encoder of one source part: a data file (paths relative to its folder), or a saved folder."""
        return AudioEncoder(self.data, self.names, self.tokenizer, self.decoder_start_id, self.max_duration_s,
                            self.max_target_tokens, part_folder(part_name))

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return encode_rows(batch, indices, AUDIO_FEATURES, lambda out, j, row: self._keep(out, j, *self._row(row)))

    def _row(self, row: dict) -> tuple[bytes, float, list[int], list[int]]:
        if row.get(self.target_key) is None:
            raise BadRow("missing_field", f"no '{self.target_key}' field")
        ids, labels = self._targets(row[self.target_key])
        data = audio_bytes(row.get(self.audio_key), self.audio_key, self.folder)
        samples, rate = read_audio(data, f"'{self.audio_key}'")
        if not len(samples):
            raise BadRow("empty_audio", f"'{self.audio_key}': the audio file holds no samples")
        return data, len(samples) / rate, ids, labels

    def _targets(self, value: Any) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the row's label id or transcript."""
        if self.labels is not None:
            return [], [self.labels.label_id(value, f"'{self.target_key}'")]
        if not isinstance(value, str):
            raise BadRow("wrong_type", f"'{self.target_key}' must be a transcript string, got {type(value).__name__}")
        ids = list(self.tokenizer(value).input_ids)
        if not ids or ids[0] != self.decoder_start_id:  # tokenizers that do not start the decoder's prompt
            ids = [self.decoder_start_id, *ids]
        special = set(self.tokenizer.all_special_ids)
        prompt = next((i for i, t in enumerate(ids) if t not in special), len(ids) - 1)
        return ids, [IGNORE_INDEX] * prompt + ids[prompt:]

    def _keep(self, out: dict, j: int, data: bytes, duration_s: float, ids: list[int], labels: list[int]) -> None:
        out["audio"][j], out["duration_s"][j] = data, duration_s
        if self.max_duration_s is not None and duration_s > self.max_duration_s:
            drop(out, j, "too_long", f"{duration_s:.2f} s of audio > {self.max_duration_s:g} s")
            return
        if self.max_target_tokens is not None and len(ids) > self.max_target_tokens:
            drop(out, j, "too_long", f"{len(ids)} transcript tokens > {self.max_target_tokens}")
            return
        out["input_ids"][j], out["labels"][j], out["truncated"][j], out["bad"][j] = ids, labels, False, False
        out["num_supervised"][j] = 1 if self.labels is not None else sum(t != IGNORE_INDEX for t in labels[1:])
        out["length"][j] = max(len(ids), 1)
        # Fixed by the content, as for text rows: a held-out fraction never has a copy of an eval row in training.
        target = repr(labels).encode()
        digest = hashlib.blake2b(data + target, digest_size=8).digest()
        out["heldout_u"][j] = int.from_bytes(digest, "big") / 2**64


def recogniser_encoder(data: DataConfig, tokenizer: Any) -> AudioEncoder:
    """A speech recogniser's encoder: its decoder's start token, and the longest clip and transcript the
    model takes, from the model folder the tokenizer came from (e.g. Whisper's window: n_samples), or
    data.max_audio_s where that is shorter."""
    from transformers import AutoConfig, AutoFeatureExtractor

    config = AutoConfig.from_pretrained(tokenizer.name_or_path)
    extractor = AutoFeatureExtractor.from_pretrained(tokenizer.name_or_path)
    window = getattr(extractor, "n_samples", None)
    limits = [s for s in (window / extractor.sampling_rate if window else None, data.max_audio_s) if s is not None]
    return AudioEncoder(data, tokenizer=tokenizer, decoder_start_id=config.decoder_start_token_id,
                        max_duration_s=min(limits, default=None),
                        max_target_tokens=getattr(config, "max_target_positions", None))


def audio_bytes(value: Any, key: str, folder: Path | None) -> bytes:
    """A path, raw bytes, a `datasets` Audio value ({bytes, path}: bytes when present, else the path), or
    decoded samples ({array, sampling_rate}, kept losslessly as a 32-bit float WAV)."""
    if isinstance(value, dict) and value.get("array") is not None:
        return samples_as_wav(value["array"], value.get("sampling_rate"), key)
    return file_bytes(value, key, folder, "an audio file's path or bytes", "missing_audio")


def samples_as_wav(array: Any, rate: Any, key: str) -> bytes:
    if not isinstance(rate, int) or rate <= 0:
        raise BadRow("wrong_type", f"'{key}': decoded samples need a positive integer sampling_rate, got {rate!r}")
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(array, dtype=np.float32), rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def read_audio(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """The whole clip as mono float32 samples and its sampling rate; a bad row unless it decodes, to its end."""
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile's LibsndfileError, or a TypeError/RuntimeError from odd files
        raise BadRow("unreadable_audio", f"{where}: not a readable audio file ({type(err).__name__}: {err})") from None
    # Channels averaged, as transformers' pipelines expect one channel and `datasets.Audio` mixes down.
    return samples.mean(axis=1), int(rate)


def undecoded(dataset: Any, field: str) -> Any:
    """The dataset with an Audio column left as {bytes, path}: decoding it would need torchcodec."""
    column = (dataset.features or {}).get(field)
    return dataset.cast_column(field, datasets.Audio(decode=False)) if isinstance(column, datasets.Audio) else dataset


# ---------------------------------------------------------------- batches (workers)


def augmented(samples: np.ndarray, rate: int, cfg: AudioAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    if cfg.speed is not None:
        factor = rng.uniform(*cfg.speed)
        # Played `factor` times faster: the samples read as if recorded at rate * factor.
        samples = soxr.resample(samples, rate * factor, rate)
    if cfg.gain_db is not None:
        samples = samples * np.float32(10 ** (rng.uniform(-cfg.gain_db, cfg.gain_db) / 20))
    if cfg.noise_snr_db is not None:
        power = float(np.mean(samples**2))
        noise_power = power / 10 ** (rng.uniform(*cfg.noise_snr_db) / 10)
        samples = samples + rng.normal(0.0, np.sqrt(noise_power), len(samples)).astype(np.float32)
    return samples.astype(np.float32)


def at_rate(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """The samples resampled to the feature extractor's rate (unchanged when it is theirs already)."""
    return samples if rate == target_rate else soxr.resample(samples, rate, target_rate).astype(np.float32)


@dataclass(frozen=True)
class AudioBatches:
    """Saved audio rows as model inputs: the feature extractor's features (and attention mask, where it
    makes one) and labels: a classifier's label ids, or a recogniser's decoder inputs and targets.

    `pad_id`: the decoder's pad token for recognition (rows with a transcript); None for classification.
    """

    feature_extractor: Any
    augment: AudioAugmentConfig | None
    seed: int
    pad_id: int | None = None
    dtype: torch.dtype = torch.float32  # the model's

    def __call__(self, rows: dict[str, list], indices: Any = None, step: int | None = None) -> dict[str, torch.Tensor]:
        """`step`: the training step (augmented when configured, seeded by seed, step and row); None in
        validation (never augmented)."""
        batch = self.features(self.clips(rows["audio"], indices, step))
        if self.pad_id is None:
            batch["labels"] = torch.tensor([labels[:1] for labels in rows["labels"]], dtype=torch.long)
        else:
            batch.update(decoder_targets(rows["input_ids"], rows["labels"], self.pad_id))
        return batch

    def clips(self, audio: list[bytes], indices: Any, step: int | None) -> list[np.ndarray]:
        rate = self.feature_extractor.sampling_rate
        clips = [at_rate(*read_audio(data, "audio"), rate) for data in audio]
        if self.augment is None or step is None:
            return clips
        return [augmented(clip, rate, self.augment, np.random.default_rng([self.seed, step, int(row)]))
                for clip, row in zip(clips, indices)]

    def features(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        extractor = self.feature_extractor
        # Whisper-style extractors pad every clip to their fixed window (the encoder takes nothing else);
        # the others pad to the batch's longest clip and say which samples are padding.
        fixed_window = getattr(extractor, "n_samples", None) is not None
        made = extractor(clips, sampling_rate=extractor.sampling_rate, return_tensors="pt",
                         padding="max_length" if fixed_window else "longest")
        return {name: value.to(self.dtype) if value.is_floating_point() else value for name, value in made.items()}


def decoder_targets(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Teacher forcing: the decoder reads the target sequence but its last token and predicts it shifted
    by one, so logits and labels line up position by position (the loss takes no further shift).
    Passed explicitly rather than left to the model's own shift of `labels`: that would replace the
    masked prompt with padding in the decoder's inputs."""
    longest = max(len(ids) for ids in input_ids) - 1
    decoder_ids = torch.full((len(input_ids), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(input_ids), longest), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labs) in enumerate(zip(input_ids, labels)):
        decoder_ids[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, : len(labs) - 1] = torch.tensor(labs[1:])
    return {"decoder_input_ids": decoder_ids, "labels": targets}
