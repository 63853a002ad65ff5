"""Generate the small speech data of the speech tasks: configs/data/speech/ (recognition: short phrases
and their transcripts) and configs/data/commands/ (classification: one command word per clip).

    python launch/make_speech_data.py [--out DIR]   # DIR gets speech/ and commands/

Real synthetic speech: Debian's `espeak-ng` (apt-get install espeak-ng) speaks a closed vocabulary (the
ten digits and a dozen commands) in several voices, speeds and pitches; each clip is trimmed of its
trailing silence and resampled from espeak's 22.05 kHz to 16 kHz mono, 16-bit. The held-out split is
spoken by voices that never occur in training, at speeds between the training ones, so it is not a copy.

Written in every shape the audio formats read: speech/train.parquet holds FLAC bytes in a `datasets`
Audio column; speech/eval.jsonl and commands/train.jsonl name FLAC files; commands/eval.jsonl names
WAV files (paths relative to the JSONL file). About 3 MB in all.

Reproducible: the phrases, voices, speeds and pitches are drawn from a seeded generator, and espeak-ng
renders the same samples for the same arguments (checked: byte-identical across runs of espeak-ng 1.51
here), so rerunning with the same espeak-ng gives identical files. Another espeak-ng release may render
slightly different audio (its voices and phoneme rules change between releases), the rows stay the same.
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import soundfile as sf
import soxr

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "configs" / "data"
SAMPLE_RATE = 16_000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "open", "close")
# espeak-ng voices: a language and a variant (its timbre). Held-out voices are variants training never hears.
TRAIN_VOICES = ("en-us", "en-gb", "en-us+m3", "en-gb+m6", "en-us+f2", "en-gb+f4", "en-us+klatt", "en-gb+m1")
HELDOUT_VOICES = ("en-us+m2", "en-gb+f1", "en-us+klatt2")
TRAIN_SPEEDS, HELDOUT_SPEEDS = (130, 150, 170, 190), (140, 180)  # words per minute (espeak's default: 175)
PITCH_RANGE = (25, 75)  # espeak's 0-99 scale (default 50)
SILENCE = 0.02  # amplitude under which espeak's output counts as silence (its trailing pause is cut)
TAIL_S = 0.05  # silence kept after the last sound


def require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is missing: install it with `apt-get install espeak-ng` (Debian/Ubuntu), then rerun")


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """16 kHz float32 samples of espeak-ng saying `text`, its trailing silence trimmed."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    loud = np.flatnonzero(np.abs(samples) > SILENCE)
    end = min(len(samples), loud[-1] + int(TAIL_S * rate)) if len(loud) else len(samples)
    return soxr.resample(samples[:end], rate, SAMPLE_RATE).astype(np.float32)


def encoded(samples: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format=kind, subtype="PCM_16")
    return buffer.getvalue()


def phrase(rng: np.random.Generator) -> str:
    """A short command phrase: two digits, a turn, a move, a switch, or one word."""
    digit = lambda: DIGITS[rng.integers(len(DIGITS))]  # noqa: E731
    kinds = (lambda: f"{digit()} {digit()}",
             lambda: f"turn {('left', 'right')[rng.integers(2)]}",
             lambda: f"go {('up', 'down', 'left', 'right')[rng.integers(4)]} {digit()}",
             lambda: f"switch {('on', 'off')[rng.integers(2)]}",
             lambda: ("yes", "no", "stop", "open", "close")[rng.integers(5)])
    return kinds[rng.integers(len(kinds))]()


def voiced(texts: list[str], voices: tuple, speeds: tuple, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Each text spoken once, by voices in turn (every voice equally often) at a random speed and pitch."""
    out = []
    for i, text in enumerate(texts):
        speed, pitch = int(rng.choice(speeds)), int(rng.integers(*PITCH_RANGE, endpoint=True))
        out.append((text, speak(text, voices[i % len(voices)], speed, pitch)))
    return out


def write_files(rows: list[tuple[str, np.ndarray]], out: Path, split: str, kind: str, key: str) -> int:
    """Audio files under out/split/ and out/split.jsonl naming them; returns the bytes written."""
    (out / split).mkdir(parents=True, exist_ok=True)
    lines, size = [], 0
    for i, (text, samples) in enumerate(rows):
        name = f"{split}/{i:03d}.{kind.lower()}"
        data = encoded(samples, kind)
        (out / name).write_bytes(data)
        size += len(data)
        lines.append(json.dumps({"audio": name, key: text}))
    (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return size


def write_parquet(rows: list[tuple[str, np.ndarray]], path: Path, key: str) -> int:
    """FLAC bytes in a `datasets` Audio column, as a hub audio dataset holds them. The column is cast,
    not encoded: `datasets` (5.x) encodes audio values only with torchcodec, which this project lacks."""
    table = datasets.Dataset.from_dict({"audio": [{"bytes": encoded(s, "FLAC"), "path": None} for _, s in rows],
                                        key: [text for text, _ in rows]})
    table.cast_column("audio", datasets.Audio(decode=False)).to_parquet(str(path))
    return path.stat().st_size


def shuffled(rows: list, rng: np.random.Generator) -> list:
    return [rows[i] for i in rng.permutation(len(rows))]


def make_speech(out: Path, rng: np.random.Generator) -> str:
    train = voiced([phrase(rng) for _ in range(96)], TRAIN_VOICES, TRAIN_SPEEDS, rng)
    heldout = voiced([phrase(rng) for _ in range(30)], HELDOUT_VOICES, HELDOUT_SPEEDS, rng)
    out.mkdir(parents=True, exist_ok=True)
    size = write_parquet(train, out / "train.parquet", "text") + write_files(heldout, out, "eval", "FLAC", "text")
    return f"{out}: {len(train)} training clips (Parquet), {len(heldout)} held-out (FLAC files), {size / 1e6:.2f} MB"


def make_commands(out: Path, rng: np.random.Generator) -> str:
    train = shuffled(voiced([w for w in COMMANDS for _ in TRAIN_VOICES], TRAIN_VOICES, TRAIN_SPEEDS, rng), rng)
    heldout = shuffled(voiced([w for w in COMMANDS for _ in HELDOUT_VOICES], HELDOUT_VOICES, HELDOUT_SPEEDS, rng), rng)
    size = write_files(train, out, "train", "FLAC", "label") + write_files(heldout, out, "eval", "WAV", "label")
    return f"{out}: {len(train)} training clips (FLAC files), {len(heldout)} held-out (WAV files), {size / 1e6:.2f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    require_espeak()
    for name in ("speech", "commands"):
        shutil.rmtree(out / name, ignore_errors=True)  # a rerun replaces the files, none left over
    print("wrote", make_speech(out / "speech", np.random.default_rng(0)))
    print("wrote", make_commands(out / "commands", np.random.default_rng(1)))


if __name__ == "__main__":
    main()
