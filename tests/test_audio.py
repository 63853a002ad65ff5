"""Speech data and metrics, no Ray: the driver-side audio encoder on the shipped clips (file paths, bytes
in a Parquet Audio column) and on bad rows; the worker-side batches (the feature extractor's own
features, resampling, seeded training-only augmentation, teacher-forced targets that reproduce the
model's own loss, padding that changes no clip's logits); WER counts against jiwer; and the shipped
tiny models in their transformers pipelines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import jiwer
import numpy as np
import pytest
import soundfile
import torch
from transformers import (
    AutoFeatureExtractor,
    AutoModelForAudioClassification,
    AutoModelForSpeechSeq2Seq,
    AutoTokenizer,
    pipeline,
)

from sft_dist.config import AudioAugmentConfig as AudioAugment
from sft_dist.config import DataConfig
from sft_dist.data.audio import AudioBatches, AudioEncoder, at_rate, undecoded
from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.tasks.speech_metrics import SpeechCounts, transcript_words, word_edits

REPO = Path(__file__).resolve().parents[1]
SPEECH, COMMANDS = REPO / "configs" / "data" / "speech", REPO / "configs" / "data" / "commands"
WHISPER, WAV2VEC2 = REPO / "configs" / "models" / "tiny-whisper", REPO / "configs" / "models" / "tiny-wav2vec2"
COMMAND_NAMES = sorted({json.loads(line)["label"] for line in (COMMANDS / "train.jsonl").read_text().splitlines()})


@pytest.fixture(scope="module")
def whisper_parts():
    return AutoTokenizer.from_pretrained(WHISPER), AutoFeatureExtractor.from_pretrained(WHISPER)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def encode(encoder: AudioEncoder, rows: list[dict]) -> dict[str, list]:
    """The encoder as `datasets.map` calls it on a JSONL part (one JSON text per row, with its line)."""
    batch = {"_json": [json.dumps(r) for r in rows], "_line": list(range(1, len(rows) + 1)),
             "_error": [None] * len(rows)}
    return encoder(batch, list(range(len(rows))))


def classifier_encoder(folder: Path = COMMANDS, **kw) -> AudioEncoder:
    return AudioEncoder(DataConfig(train=["unused"]), names=COMMAND_NAMES, folder=folder, **kw)


def recogniser_encoder(tokenizer, folder: Path = SPEECH, **kw) -> AudioEncoder:
    start = AutoModelForSpeechSeq2Seq.from_pretrained(WHISPER).config.decoder_start_token_id
    return AudioEncoder(DataConfig(train=["unused"]), tokenizer=tokenizer, decoder_start_id=start, folder=folder, **kw)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# ---------------------------------------------------------------- driver: the encoder


def test_classification_rows_keep_the_files_bytes_duration_and_label_id():
    rows = rows_of(COMMANDS / "eval.jsonl")[:5]  # WAV files named relative to the JSONL file
    out = encode(classifier_encoder(), rows)
    for j, row in enumerate(rows):
        path = COMMANDS / row["audio"]
        assert out["reason"][j] is None and out["audio"][j] == path.read_bytes()
        assert out["duration_s"][j] == pytest.approx(soundfile.info(str(path)).duration, abs=1e-6)
        assert out["labels"][j] == [COMMAND_NAMES.index(row["label"])] and out["num_supervised"][j] == 1


def test_recognition_rows_from_a_parquet_audio_column_supervise_the_transcript_only(whisper_parts):
    tokenizer, _ = whisper_parts
    table = undecoded(datasets.Dataset.from_parquet(str(SPEECH / "train.parquet")), "audio")
    assert isinstance(table.features["audio"], datasets.Audio)  # a real Audio column, read without torchcodec
    batch = table[:4]
    out = recogniser_encoder(tokenizer)(batch, [0, 1, 2, 3])
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    for j, text in enumerate(batch["text"]):
        ids = tokenizer(text).input_ids
        assert ids[:2] == prompt and out["input_ids"][j] == ids
        assert out["labels"][j] == [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]  # words and end of text
        assert out["num_supervised"][j] == len(ids) - 2
        assert out["audio"][j] == batch["audio"][j]["bytes"]
        samples, rate = soundfile.read(io.BytesIO(batch["audio"][j]["bytes"]))
        assert out["duration_s"][j] == pytest.approx(len(samples) / rate, abs=1e-6)


def test_bad_audio_rows_name_their_reason_and_long_clips_are_dropped_not_bad(tmp_path):
    good = COMMANDS / rows_of(COMMANDS / "eval.jsonl")[0]["audio"]
    (tmp_path / "cut.flac").write_bytes((COMMANDS / "train" / "000.flac").read_bytes()[:300])  # header intact
    (tmp_path / "empty.wav").write_bytes(wav_bytes(np.zeros(0, dtype=np.float32), 16_000))
    rows = [{"audio": "nowhere.wav", "label": "yes"}, {"audio": "cut.flac", "label": "yes"},
            {"audio": "empty.wav", "label": "yes"}, {"audio": 3, "label": "yes"}, {"audio": str(good)},
            {"audio": str(good), "label": "maybe"}, {"audio": str(good), "label": "yes"}]
    out = encode(classifier_encoder(tmp_path, max_duration_s=0.1), rows)
    assert out["reason"] == ["missing_audio", "unreadable_audio", "empty_audio", "wrong_type", "missing_field",
                             "unknown_label", "too_long"]
    assert out["bad"] == [True] * 6 + [False]
    assert str(tmp_path / "nowhere.wav") in out["detail"][0] and "'audio'" in out["detail"][1]


def test_transcripts_past_the_decoders_length_are_dropped(whisper_parts):
    tokenizer, _ = whisper_parts
    rows = [{"audio": "eval/000.flac", "text": "one two three"}, {"audio": "eval/000.flac", "text": "one two"}]
    out = encode(recogniser_encoder(tokenizer, max_target_tokens=5), rows)
    assert out["reason"] == ["too_long", None]  # 2 prompt tokens + 3 words + end of text = 6


# ---------------------------------------------------------------- workers: batches


def test_validation_features_are_the_feature_extractors_and_other_rates_are_resampled(whisper_parts):
    _, extractor = whisper_parts
    rows = rows_of(SPEECH / "eval.jsonl")[:3]
    audio = [(SPEECH / r["audio"]).read_bytes() for r in rows]
    clips = [soundfile.read(io.BytesIO(a), dtype="float32")[0] for a in audio]
    batch = AudioBatches(extractor, AudioAugment(), seed=0, pad_id=0)(
        {"audio": audio, "input_ids": [[1, 2, 3]] * 3, "labels": [[-100, 2, 3]] * 3})
    expected = extractor(clips, sampling_rate=16_000, return_tensors="pt")["input_features"]
    assert torch.equal(batch["input_features"], expected)  # and no augmentation without a step
    # 8 kHz in, 16 kHz out: twice the samples, the tone's frequency kept.
    tone = np.sin(2 * np.pi * 440 * np.arange(4000) / 8000).astype(np.float32)
    resampled = at_rate(tone, 8000, 16_000)
    assert len(resampled) == 8000
    assert np.argmax(np.abs(np.fft.rfft(resampled))) * 16_000 / len(resampled) == pytest.approx(440, abs=2)


def test_augmentation_is_seeded_per_step_and_row_and_off_in_validation():
    extractor = AutoFeatureExtractor.from_pretrained(WAV2VEC2)
    rows = {"audio": [(COMMANDS / r["audio"]).read_bytes() for r in rows_of(COMMANDS / "eval.jsonl")[:3]],
            "labels": [[0], [1], [2]]}
    batches = AudioBatches(extractor, AudioAugment(), seed=7)
    plain = batches(rows)["input_values"]
    step3 = batches(rows, [5, 6, 7], 3)["input_values"]
    assert torch.equal(step3, batches(rows, [5, 6, 7], 3)["input_values"])  # a rerun draws the same
    for other in (batches(rows, [5, 6, 7], 4), batches(rows, [9, 6, 7], 3),
                  AudioBatches(extractor, AudioAugment(), seed=8)(rows, [5, 6, 7], 3)):
        assert not torch.equal(other["input_values"][0], step3[0])
    assert not torch.equal(step3[0][: plain.shape[1]], plain[0][: step3.shape[1]])
    assert batches(rows)["labels"].tolist() == [[0], [1], [2]]
    with pytest.raises(ValueError, match="speed"):
        AudioAugment(speed=(1.2, 0.9))


def test_teacher_forced_targets_give_the_models_own_loss_and_the_counts_its_sum(whisper_parts):
    tokenizer, extractor = whisper_parts
    model = AutoModelForSpeechSeq2Seq.from_pretrained(WHISPER).eval()
    rows = rows_of(SPEECH / "eval.jsonl")[:4]
    encoded = encode(recogniser_encoder(tokenizer), rows)
    batch = AudioBatches(extractor, None, seed=0, pad_id=tokenizer.pad_token_id)(encoded)
    with torch.no_grad():
        out = model(**batch)
    counts = SpeechCounts().counts(out.logits, batch["labels"], ["x"] * 4, [r["text"] for r in rows])
    assert counts[1] == sum(encoded["num_supervised"])  # every word and end of text, nothing of the prompt
    assert (counts[0] / counts[1]).item() == pytest.approx(out.loss.item(), rel=1e-5)
    # The decoder reads the prompt and the words: the model's own shift of the targets would read padding.
    assert batch["decoder_input_ids"][0, :2].tolist() == tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|notimestamps|>"])


def test_a_padded_batch_changes_no_clips_logits():
    extractor = AutoFeatureExtractor.from_pretrained(WAV2VEC2)
    torch.manual_seed(0)
    model = AutoModelForAudioClassification.from_pretrained(WAV2VEC2, num_labels=len(COMMAND_NAMES)).eval()
    audio = [(COMMANDS / r["audio"]).read_bytes() for r in rows_of(COMMANDS / "eval.jsonl")[:4]]
    batches = AudioBatches(extractor, None, seed=0)
    together = batches({"audio": audio, "labels": [[0]] * 4})
    assert together["attention_mask"].sum(1).unique().numel() > 1  # the clips differ in length: padding
    with torch.no_grad():
        batched = model(**{k: v for k, v in together.items() if k != "labels"}).logits
        alone = torch.cat([model(**{k: v for k, v in batches({"audio": [a], "labels": [[0]]}).items()
                                    if k != "labels"}).logits for a in audio])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- WER counts


WER_CASES = [  # (hypothesis, reference)
    ("turn left", "turn left"),
    ("turn right", "turn left"),  # a substitution
    ("go up", "go up five"),  # a deletion
    ("three three five", "three five"),  # an insertion
    ("", "switch on"),  # nothing transcribed
    ("five three", "three five"),  # two words swapped: 2 edits
    (" Stop.", "stop"),  # Whisper's leading space, capitals and punctuation are no error
    ("one two three four", "four three two one"),
    ("go down nine nine", "go down"),
]


def test_word_edits_equal_jiwers_counts():
    for hypothesis, reference in WER_CASES:
        hyp, ref = transcript_words(hypothesis), transcript_words(reference)
        measured = jiwer.process_words(" ".join(ref), " ".join(hyp) or "<nothing>") if hyp else None
        expected = measured.substitutions + measured.deletions + measured.insertions if measured else len(ref)
        assert word_edits(hyp, ref) == expected, (hypothesis, reference)


def test_wer_from_counts_summed_over_ranks_is_the_corpus_wer():
    hypotheses, references = [h for h, _ in WER_CASES], [r for _, r in WER_CASES]
    counts = SpeechCounts()
    logits, labels = torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long)
    # Two "ranks" with unequal shares: a mean of their rates would differ from the corpus rate.
    totals = counts.counts(logits, labels, hypotheses[:2], references[:2]) + counts.counts(
        logits, labels, hypotheses[2:], references[2:])
    metrics = counts.metrics(totals.tolist())
    normal = [" ".join(transcript_words(t)) for t in hypotheses]
    expected = jiwer.wer([" ".join(transcript_words(t)) for t in references], [t or "<nothing>" for t in normal])
    assert metrics["eval_wer"] == pytest.approx(expected)
    assert metrics["eval_clips"] == len(WER_CASES) and metrics["eval_words"] == sum(len(r.split()) for r in references)


# ---------------------------------------------------------------- the shipped models


def test_the_tiny_models_load_in_their_pipelines_as_trained_they_decode(whisper_parts):
    tokenizer, extractor = whisper_parts
    clip = soundfile.read(str(SPEECH / rows_of(SPEECH / "eval.jsonl")[0]["audio"]), dtype="float32")[0]
    recogniser = pipeline("automatic-speech-recognition", model=str(WHISPER))
    model = AutoModelForSpeechSeq2Seq.from_pretrained(WHISPER).eval()
    generated = model.generate(extractor(clip, sampling_rate=16_000, return_tensors="pt")["input_features"])
    # Greedy decoding is what the exported model's pipeline answers when asked for one beam (its own
    # default is 5 beams, as openai's whisper, unless the model's generation config sets num_beams).
    answer = recogniser({"raw": clip, "sampling_rate": 16_000}, generate_kwargs={"num_beams": 1})["text"]
    assert answer == tokenizer.decode(generated[0], skip_special_tokens=True)
    classifier = pipeline("audio-classification", model=str(WAV2VEC2))
    assert len(classifier({"raw": clip, "sampling_rate": 16_000}, top_k=2)) == 2
