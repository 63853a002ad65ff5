"""Speech on 2 Ray workers: configs/speech-tiny.yaml (Whisper-style speech to text) and
configs/commands-tiny.yaml (wav2vec2-style voice commands), shortened, exported at the end. Their held-out
metrics improve from step 0 and equal a single process's on the export (jiwer on the export's own
pipeline transcripts; the export's own forward for accuracy); the pipelines answer; a bad clip is named by
file and line; LoRA under ZeRO-3 keeps the parts it trained, as its saved adapter says (on Whisper:
wav2vec2's weight-normed positional convolution does not run under ZeRO-3's partitioned parameters)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file
from test_tasks import reference_macro_f1

from sft_dist import checkpoints

from conftest import REPO, TINY_CONFIG, read_events, subprocess_env

SPEECH_CONFIG, COMMANDS_CONFIG = REPO / "configs" / "speech-tiny.yaml", REPO / "configs" / "commands-tiny.yaml"
SPEECH, COMMANDS = REPO / "configs" / "data" / "speech", REPO / "configs" / "data" / "commands"
WHISPER = REPO / "configs" / "models" / "tiny-whisper"


def train(config: Path, output_dir: Path, *overrides: str, run_name: str = "run",
          extra_args: tuple[str, ...] = ()) -> Path:
    from sft_dist.cli import main

    code = main(["train", str(config), "--set", f"output_dir={output_dir}", "--set", f"run_name={run_name}",
                 *[arg for o in overrides for arg in ("--set", o)], *extra_args])
    assert code == 0, f"training exited {code}"
    return output_dir / run_name


def evals(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if "eval_loss" in e]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def clip(path: Path) -> dict:
    samples, rate = soundfile.read(str(path), dtype="float32")
    return {"raw": samples, "sampling_rate": rate}


@pytest.fixture(scope="module")
def speech_run(ray_cluster, tmp_path_factory) -> Path:
    return train(SPEECH_CONFIG, tmp_path_factory.mktemp("speech"), "train.max_steps=120", "eval.every_steps=null",
                 "train.lr=5e-3", "checkpoint.every_steps=120", "checkpoint.export_at_end=true")


@pytest.fixture(scope="module")
def commands_run(ray_cluster, tmp_path_factory) -> Path:
    return train(COMMANDS_CONFIG, tmp_path_factory.mktemp("commands"), "train.max_steps=90", "eval.every_steps=null",
                 "train.lr=3e-3", "checkpoint.every_steps=90", "checkpoint.export_at_end=true")


@pytest.mark.timeout(600)
def test_wer_falls_from_step_0_and_equals_jiwer_on_the_exports_pipeline(speech_run):
    from transformers import pipeline

    first, last = evals(speech_run)
    assert first["step"] == 0 and last["step"] == 120
    assert last["eval_wer"] < first["eval_wer"] - 0.2 and last["eval_loss"] < first["eval_loss"], (first, last)
    rows = rows_of(SPEECH / "eval.jsonl")
    recognise = pipeline("automatic-speech-recognition", model=str(speech_run / "model"), device="cpu")
    answers = [recognise(clip(SPEECH / r["audio"]), generate_kwargs={"num_beams": 1})["text"] for r in rows]
    # jiwer's WER over lowercased words without punctuation, as sft_dist compares them.
    clean = jiwer.Compose([jiwer.ToLowerCase(), jiwer.SubstituteRegexes({r"[^\w']+": " "}), jiwer.Strip(),
                           jiwer.ReduceToListOfListOfWords()])
    hypotheses = [a if a.strip() else "<nothing>" for a in answers]  # jiwer refuses empty hypotheses
    expected = jiwer.wer([r["text"] for r in rows], hypotheses, reference_transform=clean,
                         hypothesis_transform=clean)
    assert last["eval_clips"] == len(rows)
    assert last["eval_wer"] == pytest.approx(expected), (answers, last)
    samples = [json.loads(line) for line in (speech_run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 120]
    by_clip = {f"held-out clip {i}": a.strip() for i, a in enumerate(answers)}
    assert all(s["answer"] == by_clip[s["prompt"]] for s in samples[-1]["samples"]), samples[-1]


def test_throughput_is_counted_in_audio_seconds(speech_run, commands_run):
    """A clip's transcript is a few tokens: the train records carry audio seconds per second (of the
    global batch's clips), and the progress line shows them instead of tokens/s."""
    from sft_dist.driver.progress import Progress
    from sft_dist.records import TrainRecord

    for run_dir in (speech_run, commands_run):
        trained = [e for e in read_events(run_dir) if "loss" in e]
        assert trained and all(e["audio_s_per_s"] > 0 for e in trained)
    record = TrainRecord(trained[-1]["step"], trained[-1])
    assert "audio s/s" in Progress().line(record) and "tok/s" not in Progress().line(record)


@pytest.mark.timeout(600)
def test_command_accuracy_rises_and_equals_the_exports_forward_and_pipeline(commands_run):
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, pipeline

    first, last = evals(commands_run)
    assert first["step"] == 0 and last["step"] == 90
    assert last["eval_accuracy"] > first["eval_accuracy"] + 0.3, (first, last)
    folder = commands_run / "model"
    model = AutoModelForAudioClassification.from_pretrained(folder).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    rows = rows_of(COMMANDS / "eval.jsonl")
    clips = [clip(COMMANDS / r["audio"])["raw"] for r in rows]
    with torch.no_grad():  # one clip at a time: no padding at all
        logits = torch.cat([model(**extractor(c, sampling_rate=16_000, return_tensors="pt")).logits for c in clips])
    target = np.array([model.config.label2id[r["label"]] for r in rows])
    predicted = logits.argmax(-1).numpy()
    assert last["eval_accuracy"] == pytest.approx((predicted == target).mean())
    assert last["eval_macro_f1"] == pytest.approx(reference_macro_f1(target, predicted))
    classify = pipeline("audio-classification", model=str(folder), device="cpu")
    answers = [classify(clip(COMMANDS / r["audio"]), top_k=1)[0]["label"] for r in rows[:8]]
    assert answers == [model.config.id2label[int(i)] for i in predicted[:8]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config, stage", [(COMMANDS_CONFIG, 3), (SPEECH_CONFIG, 2)],
                         ids=["commands-zero3", "speech-zero2"])
def test_a_resumed_run_continues_the_uninterrupted_one(config, stage, tmp_path):
    """Resumed from its step-3 checkpoint, a run trains steps 4-6 as the uninterrupted run did: the data
    position, the seeded augmentation (the commands config's gain, speed and noise) and the optimizer and
    schedule all come back, under ZeRO-3 (wav2vec2's weight-normed convolution partitioned) and ZeRO-2.
    One process (--no-ray): the checkpoint is the subject."""
    common = ["train.max_steps=6", "checkpoint.every_steps=3", "logging.every_steps=1", "eval.every_steps=null",
              "eval.at_start=false", "eval.at_end=false", f"deepspeed.stage={stage}"]
    whole = train(config, tmp_path, *common, extra_args=("--no-ray",))
    again = train(config, tmp_path, *common, run_name="again",
                  extra_args=("--no-ray", "--resume", str(whole / checkpoints.folder_name(3))))
    losses = {run: {e["step"]: e["loss"] for e in read_events(run) if "loss" in e} for run in (whole, again)}
    assert sorted(losses[again]) == [4, 5, 6]
    assert [losses[again][s] for s in (4, 5, 6)] == pytest.approx([losses[whole][s] for s in (4, 5, 6)], rel=1e-6)


@pytest.mark.timeout(300)
def test_early_stopping_on_wer_and_sft_dist_eval_of_its_checkpoint(tmp_path, capsys):
    """eval.metric eval_wer (lower is better) drives early stopping: no improvement by 10 (WER cannot) in
    2 validations after step 0 stops the run at step 4; `sft-dist eval` of the step-4 checkpoint, a process
    of its own making, reports the run's own step-4 validation."""
    from sft_dist.cli import main

    run = train(SPEECH_CONFIG, tmp_path, "train.max_steps=20", "eval.every_steps=2", "checkpoint.every_steps=2",
                "eval.early_stopping.patience=2", "eval.early_stopping.min_delta=10", extra_args=("--no-ray",))
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps"]) == ("early_stopping", 4)
    assert [e["step"] for e in evals(run)] == [0, 2, 4]
    capsys.readouterr()
    assert main(["eval", str(SPEECH_CONFIG), "--no-ray", "--checkpoint", str(run / checkpoints.folder_name(4)),
                 "--set", f"output_dir={tmp_path}"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("eval_loss", "eval_wer", "eval_token_acc"):
        assert again[key] == pytest.approx(evals(run)[-1][key], rel=1e-6), key


@pytest.mark.timeout(120)
def test_clips_past_max_audio_s_are_skipped_and_counted(tmp_path, capsys):
    """data.max_audio_s bounds a clip as data.max_seq_len bounds text: the longer ones (by soundfile's
    reading of each held-out clip) are counted as too_long; a text format refuses the key."""
    from sft_dist import config as config_lib
    from sft_dist.cli import main
    from sft_dist.errors import UserError

    limit = 0.4
    longer = sum(soundfile.info(str(COMMANDS / r["audio"])).duration > limit for r in rows_of(COMMANDS / "eval.jsonl"))
    assert 0 < longer < len(rows_of(COMMANDS / "eval.jsonl"))
    assert main(["data", str(COMMANDS_CONFIG), "--set", f"data.max_audio_s={limit}",
                 "--set", f"output_dir={tmp_path}"]) == 0
    assert f"dropped (too_long {longer})" in capsys.readouterr().out
    with pytest.raises(UserError, match="data.max_audio_s: for audio"):
        config_lib.load(TINY_CONFIG, ["data.max_audio_s=2"])


@pytest.mark.timeout(120)
def test_a_missing_clip_exits_2_naming_file_and_line(tmp_path, capsys):
    from sft_dist.cli import main

    good = rows_of(COMMANDS / "eval.jsonl")[0]
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"audio": "broken.wav", "label": "up"}) + "\n")
    (tmp_path / good["audio"]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / good["audio"]).write_bytes((COMMANDS / good["audio"]).read_bytes())
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    assert main(["data", str(COMMANDS_CONFIG), "--set", f"data.eval={bad}", "--set", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: unreadable_audio: 'audio': not a readable audio file" in err, err


@pytest.mark.timeout(180)
def test_zero3_builds_both_speech_models_partitioned_with_the_checkpoints_weights():
    """Whisper's init reads its sinusoids' shape and wav2vec2's weight norm its partitioned halves: built as
    a ZeRO-3 run builds them, each gathered parameter equals transformers' plain loader's, the new head is
    initialised at the config's scale, and Whisper's output projection stays tied to its embeddings."""
    wav2vec2 = REPO / "configs" / "models" / "tiny-wav2vec2"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fixtures" / "zero3_construction.py"), str(WHISPER),
                           str(wav2vec2)], cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    whisper, commands = found[str(WHISPER)], found[str(wav2vec2)]
    assert whisper["differs"] == commands["differs"] == [] and whisper["compared"] > 50 < commands["compared"]
    assert whisper["tied"] and commands["new_std"] == pytest.approx([0.02, 0.02], rel=0.2)


@pytest.mark.timeout(600)
def test_lora_under_zero3_keeps_what_it_trained(ray_cluster, tmp_path):
    """LoRA on the tiny Whisper under ZeRO-3 (validated at the end: generation is a collective there):
    the merged export differs from the base exactly where the saved adapter trained (each target by the
    adapter's own delta); everywhere else it is the base."""
    from peft import PeftConfig
    from transformers import AutoModelForSpeechSeq2Seq

    from sft_dist.cli import main

    run_dir = train(SPEECH_CONFIG, tmp_path, "peft.method=lora", "peft.target_modules=[q_proj,v_proj]",
                    "deepspeed.stage=3", "train.max_steps=6", "train.lr=1e-2", "eval.every_steps=null",
                    "eval.at_start=false", "checkpoint.every_steps=6")
    assert "eval_wer" in evals(run_dir)[-1]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved = PeftConfig.from_pretrained(tmp_path / "adapter")
    scale = saved.lora_alpha / saved.r
    base = AutoModelForSpeechSeq2Seq.from_pretrained(WHISPER).state_dict()
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    prefix = "base_model.model."
    lora_targets = {k.removeprefix(prefix).replace(".lora_A.weight", ".weight") for k in adapter if ".lora_A." in k}
    assert lora_targets and {k.split(".")[-2] for k in lora_targets} == {"q_proj", "v_proj"}
    assert all(".lora_" in k for k in adapter), "nothing but adapters trained"
    for name in lora_targets:
        module = prefix + name.removesuffix(".weight")
        a, b = adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"]
        assert b.abs().max() > 0, f"{name}: lora_B never trained"
        torch.testing.assert_close(merged[name], base[name] + scale * b @ a, rtol=1e-4, atol=1e-5)
    untouched = (set(base) & set(merged)) - lora_targets  # proj_out is tied to the embeddings: saved once
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)
