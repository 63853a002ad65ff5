"""Show that the tiny speech models learn the shipped speech data, with a plain PyTorch loop (not
sft_dist) on one CPU thread: held-out word error rate of tiny-whisper on configs/data/speech, held-out
accuracy of tiny-wav2vec2 (with a new classification head) on configs/data/commands.

    python launch/check_speech_learning.py {recognition,commands} [--steps N] [--lr LR] [--batch B]

The loop is what sft_dist's configs do, written out: AdamW without weight decay, a linear schedule with
10% warm-up, gradients clipped at norm 1, global batches cut from a seeded permutation of the rows per
epoch (the last partial batch dropped); no augmentation. Its defaults are the numbers
configs/speech-tiny.yaml and configs/commands-tiny.yaml are meant to use (global batch 16 = 2 workers
x micro-batch 8). Audio is read with soundfile (the clips are 16 kHz already: nothing to resample); WER
is jiwer's, over lowercased words.
"""

import argparse
import io
import json
import time
from pathlib import Path

import jiwer
import numpy as np
import pyarrow.parquet as pq
import soundfile
import torch
from transformers import (
    AutoFeatureExtractor,
    AutoModelForAudioClassification,
    AutoModelForSpeechSeq2Seq,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA, MODELS = REPO_ROOT / "configs" / "data", REPO_ROOT / "configs" / "models"
DEFAULTS = {"recognition": {"steps": 300, "lr": 3e-3}, "commands": {"steps": 240, "lr": 2e-3}}
NUM_EVALS = 6


def clip(data: bytes) -> np.ndarray:
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == 16_000 and samples.ndim == 1, (rate, samples.shape)
    return samples


def jsonl_rows(path: Path, key: str) -> tuple[list[np.ndarray], list]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [clip((path.parent / r["audio"]).read_bytes()) for r in rows], [r[key] for r in rows]


def parquet_rows(path: Path, key: str) -> tuple[list[np.ndarray], list]:
    rows = pq.read_table(path).to_pylist()
    return [clip(r["audio"]["bytes"]) for r in rows], [r[key] for r in rows]


def recognition_task() -> tuple:
    """(model, training inputs, evaluate function) for tiny-whisper on configs/data/speech."""
    folder = MODELS / "tiny-whisper"
    extractor, tokenizer = AutoFeatureExtractor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(folder)
    train_clips, train_texts = parquet_rows(DATA / "speech" / "train.parquet", "text")
    eval_clips, eval_texts = jsonl_rows(DATA / "speech" / "eval.jsonl", "text")
    features = lambda clips: extractor(clips, sampling_rate=16_000, return_tensors="pt").input_features  # noqa: E731
    # Teacher forcing: the decoder reads <|startoftranscript|><|notimestamps|> words; it is scored on the
    # words and <|endoftext|> (the prompt, which generation forces, is not a target).
    ids = [tokenizer(text).input_ids for text in train_texts]
    longest = max(map(len, ids)) - 1
    decoder_ids = torch.full((len(ids), longest), tokenizer.eos_token_id)
    labels = torch.full((len(ids), longest), -100)
    for i, seq in enumerate(ids):
        decoder_ids[i, : len(seq) - 1], labels[i, 1 : len(seq) - 1] = torch.tensor(seq[:-1]), torch.tensor(seq[2:])
    inputs = {"input_features": features(train_clips), "decoder_input_ids": decoder_ids, "labels": labels}
    eval_features = features(eval_clips)

    def evaluate() -> str:
        with torch.no_grad():
            generated = model.generate(eval_features, max_new_tokens=8)
        hypotheses = [h.strip().lower() for h in tokenizer.batch_decode(generated, skip_special_tokens=True)]
        wer = jiwer.wer(eval_texts, [h or "<nothing>" for h in hypotheses])  # jiwer refuses empty hypotheses
        return f"held-out WER {wer:.3f} (e.g. {eval_texts[0]!r} -> {hypotheses[0]!r})"

    return model, inputs, evaluate


def commands_task() -> tuple:
    """(model, training inputs, evaluate function) for tiny-wav2vec2 with a new head on configs/data/commands."""
    folder = MODELS / "tiny-wav2vec2"
    train_clips, train_words = jsonl_rows(DATA / "commands" / "train.jsonl", "label")
    eval_clips, eval_words = jsonl_rows(DATA / "commands" / "eval.jsonl", "label")
    names = sorted(set(train_words))
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    model = AutoModelForAudioClassification.from_pretrained(folder, num_labels=len(names))
    encode = lambda clips: dict(extractor(clips, sampling_rate=16_000, padding=True, return_tensors="pt"))  # noqa: E731
    inputs = {**encode(train_clips), "labels": torch.tensor([names.index(w) for w in train_words])}
    eval_inputs, eval_labels = encode(eval_clips), torch.tensor([names.index(w) for w in eval_words])

    def evaluate() -> str:
        with torch.no_grad():
            predicted = model(**eval_inputs).logits.argmax(-1)
        return f"held-out accuracy {(predicted == eval_labels).float().mean():.3f} (chance {1 / len(names):.3f})"

    return model, inputs, evaluate


def batches(num_rows: int, batch: int, seed: int = 42):
    """Global batches as sft_dist's BatchPlan cuts them: a seeded permutation per epoch, partial batch dropped."""
    for epoch in range(10**6):
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
        for start in range(0, num_rows - batch + 1, batch):
            yield torch.as_tensor(order[start : start + batch])


def train(model: torch.nn.Module, inputs: dict, evaluate, steps: int, lr: float, batch: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    num_rows, started = len(inputs["labels"]), time.perf_counter()
    model.eval()
    print(f"step 0: {evaluate()}", flush=True)
    model.train()
    for step, rows in enumerate(batches(num_rows, batch), start=1):
        loss = model(**{name: value[rows] for name, value in inputs.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % (steps // NUM_EVALS) == 0 or step == steps:
            model.eval()
            print(f"step {step}: loss {loss.item():.3f}, {evaluate()}, {time.perf_counter() - started:.0f} s",
                  flush=True)
            model.train()
        if step == steps:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(DEFAULTS))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the new head's initialisation
    model, inputs, evaluate = (recognition_task if args.task == "recognition" else commands_task)()
    defaults = DEFAULTS[args.task]
    train(model, inputs, evaluate, args.steps or defaults["steps"], args.lr or defaults["lr"], args.batch)


if __name__ == "__main__":
    main()
