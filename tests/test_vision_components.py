"""The vision tasks' parts, without Ray or DeepSpeed: the VLM, detection and segmentation encoders on the
shipped shapes data (configs/data/shapes) and the tiny models (configs/models/tiny-vlm, tiny-detector,
tiny-segformer), their batch makers, and metric counts that ranks can sum or gather. Each expected value
comes from elsewhere: the processor's own chat-template path, the tokenizer alone, a hand-computed box or
IoU, pycocotools and torchmetrics on the whole set in one process."""

from __future__ import annotations

import base64
import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from sft_dist.config import DataConfig
from sft_dist.data.batches import eval_batches
from sft_dist.data.chat import IGNORE_INDEX
from sft_dist.data.detection import DetectionBatches, DetectionEncoder
from sft_dist.data.images import undecoded
from sft_dist.data.segmentation import SegmentationBatches, SegmentationEncoder
from sft_dist.data.vlm import VlmBatches, VlmEncoder
from sft_dist.tasks.vision_metrics import DetectionScores, SegmentationCounts, mean_iou

from conftest import REPO

DATA = REPO / "configs" / "data" / "shapes"
MODELS = REPO / "configs" / "models"
SHAPES = ["square", "circle", "triangle"]
CLASSES = ["background", *SHAPES]
IMAGE_TOKENS = 16  # tiny-vlm: 32x32 pixels in 8x8 patches, CLS dropped
NUM_SCORED = 21  # held-out pictures scored by the metric tests (an odd count: the ranks' shares differ)


def lines_of(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


def encode(encoder, lines: list[str]) -> dict[str, list]:
    """The encoder over JSONL lines, as `datasets.map` calls it on a JSONL source (line numbers from 1)."""
    batch = {"_json": lines, "_line": list(range(1, len(lines) + 1)), "_error": [None] * len(lines)}
    return encoder(batch, list(range(len(lines))))


def reasons(out: dict[str, list]) -> list[str | None]:
    return out["reason"]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run several times faster on one thread than on two threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_cfg() -> DataConfig:
    return DataConfig(train=["unused.jsonl"])


# ---------------------------------------------------------------- VLM


@pytest.fixture(scope="module")
def vlm():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(MODELS / "tiny-vlm"), AutoModelForImageTextToText.from_pretrained(
        MODELS / "tiny-vlm").eval()


def with_image_paths(row: dict) -> list[dict]:
    """The row as the conversation `processor.apply_chat_template` takes: image parts naming their files."""
    images = iter(row["images"])
    messages = []
    for turn in row["messages"]:
        parts = []
        for k, text in enumerate(turn["content"].split("<image>")):
            if k:
                parts.append({"type": "image", "path": str(DATA / next(images))})
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": turn["role"], "content": parts})
    return messages


def test_vlm_rows_are_the_processors_tokens_with_only_the_answers_supervised(vlm, data_cfg):
    processor, _ = vlm
    lines = lines_of("vlm_train.jsonl")[:17]  # one- and two-turn rows, and (the 17th) a two-image row
    out = encode(VlmEncoder(data_cfg, processor, folder=DATA), lines)
    assert reasons(out) == [None] * len(lines)
    image_id = processor.image_token_id
    for line, ids, labels, images in zip(lines, out["input_ids"], out["labels"], out["images"]):
        row = json.loads(line)
        reference = processor.apply_chat_template(with_image_paths(row), tokenize=True, return_dict=True)
        assert ids == reference["input_ids"][0]  # the inference path: template, image expansion, tokens
        assert ids.count(image_id) == IMAGE_TOKENS * len(row["images"]) and len(images) == len(row["images"])
        answers = [t["content"] + "<|im_end|>" for t in row["messages"] if t["role"] == "assistant"]
        expected = [i for text in answers for i in processor.tokenizer(text, add_special_tokens=False)["input_ids"]]
        assert [label for label in labels if label != IGNORE_INDEX] == expected
        assert image_id not in labels
    assert [json.loads(line)["images"][0] for line in lines[:1]] == ["images/train/0000.png"]
    assert out["images"][0][0] == (DATA / "images/train/0000.png").read_bytes()
    assert any(len(images) == 2 for images in out["images"]) and any(n == 4 for n in out["num_supervised"])


def test_content_parts_rows_encode_as_their_placeholder_twins(vlm, data_cfg):
    processor, _ = vlm
    encoder = VlmEncoder(data_cfg, processor, folder=DATA)
    placeholders, parts = encode(encoder, lines_of("vlm_eval.jsonl")), encode(encoder, lines_of("vlm_eval_parts.jsonl"))
    kinds = {p["type"] for line in lines_of("vlm_eval_parts.jsonl") for t in json.loads(line)["messages"]
             if isinstance(t["content"], list) for p in t["content"]}
    assert kinds == {"image_url", "image", "text"}
    assert reasons(parts) == [None] * len(parts["reason"])
    for key in ("input_ids", "labels", "images", "heldout_u"):
        assert parts[key] == placeholders[key], key


def conversation(content, images=None, answer="red") -> str:
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
    return json.dumps(row | ({"images": images} if images is not None else {}))


def test_bad_vlm_rows_are_named_and_counted(vlm, data_cfg):
    processor, _ = vlm
    picture = "images/eval/0000.png"
    data_url = "data:image/png;base64," + base64.b64encode((DATA / picture).read_bytes()).decode()
    cases = {
        conversation("<image>What colour?", [picture]): None,
        conversation([{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "Hi"}]): None,
        conversation([{"type": "image"}, {"type": "text", "text": "Hi"}], [picture]): None,  # images from the list
        conversation("<image><image>Two?", [picture]): "image_count_mismatch",
        conversation("No image?", [picture]): "image_count_mismatch",
        conversation("<image>Where?", ["images/eval/no-such.png"]): "missing_image",
        conversation("<image>Which?", ["segmentation_eval.jsonl"]): "unreadable_image",
        conversation([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]): "remote_image",
        conversation([{"type": "audio", "audio": "a.wav"}]): "bad_content_part",
        conversation("Hi", answer="<image>"): "image_count_mismatch",
        json.dumps({"messages": [{"role": "user", "content": "<image>Hi"},
                                 {"role": "assistant", "content": [{"type": "image_url", "image_url": picture}]}],
                    "images": [picture]}): "image_outside_user_turn",
        json.dumps({"messages": [{"role": "human", "content": "Hi"}]}): "unknown_role",
        json.dumps({"messages": [{"role": "user", "content": "<image>Hi"}], "images": [picture]}): "no_assistant_turn",
        "[1, 2]": "not_an_object",
    }
    out = encode(VlmEncoder(data_cfg, processor, folder=DATA), list(cases))
    assert reasons(out) == list(cases.values()), [d for d in out["detail"]]
    assert "no-such.png" in out["detail"][5] and out["bad"][3] and out["line"][3] == 4


def test_vlm_rows_too_long_are_cut_after_their_images_or_dropped(vlm):
    processor, _ = vlm
    two_turns = lines_of("vlm_train.jsonl")[1]  # 69 tokens, the image's 16 tokens near the start
    for max_len, truncation, reason in ((44, "right", None), (44, "drop", "too_long"), (10, "right", "too_long")):
        cfg = DataConfig(train=["unused.jsonl"], max_seq_len=max_len, truncation=truncation)
        out = encode(VlmEncoder(cfg, processor, folder=DATA), [two_turns])
        assert out["reason"] == [reason] and out["bad"] == [False]  # a length drop, not a bad row
        if reason is None:  # the first answer kept whole
            assert len(out["input_ids"][0]) == 44 and out["truncated"] == [True] and out["num_supervised"][0] == 2
        else:
            assert out["length"] == [69] and ("image's tokens" in out["detail"][0]) == (max_len == 10)


def test_vlm_batches_give_each_row_the_logits_it_has_alone(vlm, data_cfg):
    """Padded rows with one and two images: each row's logits equal those of the processor's own inputs
    for that conversation alone (pixels in row order, padding masked)."""
    processor, model = vlm
    lines = [lines_of("vlm_train.jsonl")[i] for i in (0, 2, 12, 16)]  # 16: two images
    out = encode(VlmEncoder(data_cfg, processor, folder=DATA), lines)
    batch = VlmBatches(processor, processor.tokenizer.pad_token_id)({k: out[k] for k in ("input_ids", "labels",
                                                                                         "images")})
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for i, line in enumerate(lines):
            alone = processor.apply_chat_template(with_image_paths(json.loads(line)), tokenize=True, return_dict=True,
                                                  return_tensors="pt")
            n = alone["input_ids"].shape[1]
            assert torch.allclose(logits[i, :n], model(**alone).logits[0], atol=1e-5)
            assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and batch["attention_mask"][i].sum() == n


# ---------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def detector():
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    return (AutoImageProcessor.from_pretrained(MODELS / "tiny-detector", backend="pil"),
            AutoModelForObjectDetection.from_pretrained(MODELS / "tiny-detector").eval())


def test_detection_rows_from_jsonl_names_and_parquet_ids(data_cfg):
    encoder = DetectionEncoder(data_cfg, SHAPES)
    lines = lines_of("detection_eval.jsonl")
    out = encode(encoder.for_part(str(DATA / "detection_eval.jsonl")), lines)
    first = json.loads(lines[0])["objects"]
    assert out["boxes"][0] == first["bbox"] and out["categories"][0] == [SHAPES.index(c) for c in first["category"]]
    table = undecoded(datasets.Dataset.from_parquet(str(DATA / "detection_train.parquet")), "image")
    saved = table.map(encoder.for_part(str(DATA / "detection_train.parquet")), batched=True, with_indices=True,
                      remove_columns=table.column_names, features=encoder.features)
    assert set(saved["reason"]) == {None} and len(saved) == 320
    assert saved[5]["categories"] == table[5]["objects"]["category"]
    assert saved[5]["boxes"] == table[5]["objects"]["bbox"]
    assert saved[5]["image"] == table[5]["image"]["bytes"]


def test_bad_boxes_and_categories_are_named(data_cfg):
    picture = "images/eval/0000.png"  # 32x32

    def row(bbox, category, image=picture) -> str:
        return json.dumps({"image": image, "objects": {"bbox": bbox, "category": category}})

    cases = {
        row([[0, 0, 32, 32], [-0.4, 1, 10, 31.3]], ["square", 2]): None,  # within half a pixel: clipped
        row([[20, 20, 13, 5]], ["circle"]): "box_outside_image",
        row([[-2, 0, 5, 5]], ["circle"]): "box_outside_image",
        row([[1, 1, 0, 5]], ["circle"]): "bad_box",
        row([[1, 1, 5]], ["circle"]): "bad_box",
        row([[1, 1, 5, "5"]], ["circle"]): "bad_box",
        row([[1, 1, 5, 5]], ["hexagon"]): "unknown_category",
        row([[1, 1, 5, 5]], [3]): "unknown_category",
        row([[1, 1, 5, 5]], []): "objects_mismatch",
        row([[1, 1, 5, 5]], ["circle"], image="images/eval/none.png"): "missing_image",
        json.dumps({"image": picture}): "missing_field",
        json.dumps({"image": picture, "objects": [[1, 1, 5, 5]]}): "wrong_type",
    }
    out = encode(DetectionEncoder(data_cfg, SHAPES, DATA), list(cases))
    assert reasons(out) == list(cases.values()), out["detail"]
    assert out["boxes"][0] == [[0, 0, 32, 32], [0, 1, 9.6, 31]] and out["categories"][0] == [0, 2]
    assert out["detail"][1] == "objects.bbox[0] is [20, 20, 13, 5], outside the 32x32 image"


def test_detection_targets_are_the_boxes_normalised(data_cfg, detector):
    processor, model = detector
    out = encode(DetectionEncoder(data_cfg, SHAPES, DATA), lines_of("detection_eval.jsonl")[:3])
    batch = DetectionBatches(processor)({k: out[k] for k in ("image", "boxes", "categories")}, [7, 8, 9])
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    x, y, w, h = out["boxes"][0][0]  # [16, 15, 13, 13] in a 32x32 picture: centre and size over 32
    assert torch.allclose(batch["labels"][0]["boxes"][0], torch.tensor([(x + w / 2) / 32, (y + h / 2) / 32, w / 32,
                                                                        h / 32]))
    assert batch["labels"][0]["class_labels"].tolist() == out["categories"][0]
    assert batch["labels"][0]["orig_size"].tolist() == [32, 32] and batch["labels"][2]["image_id"].tolist() == [9]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def predicted(model, queries: list[list[tuple[list[float], int, float]]]):
    """Model outputs that place, per image, the given (COCO box in a 32x32 picture, category, logit)
    queries; every other query scores low."""
    from transformers.models.conditional_detr.modeling_conditional_detr import ConditionalDetrObjectDetectionOutput

    num_queries = model.config.num_queries
    logits = torch.full((len(queries), num_queries, len(SHAPES)), -9.0)
    boxes = torch.full((len(queries), num_queries, 4), 0.5)
    for i, image in enumerate(queries):
        for q, ((x, y, w, h), category, logit) in enumerate(image):
            logits[i, q, category] = logit
            boxes[i, q] = torch.tensor([(x + w / 2) / 32, (y + h / 2) / 32, w / 32, h / 32])
    return ConditionalDetrObjectDetectionOutput(logits=logits, pred_boxes=boxes)


def test_detection_map_of_a_hand_checked_shift(data_cfg, detector):
    """A box predicted 2 px to the right of a 10x10 truth overlaps it by IoU 80/120 = 0.67: a hit at the
    IoU thresholds 0.50, 0.55, 0.60 and 0.65 of COCO's ten, so mAP 0.4, mAP@50 1, mAP@75 0."""
    processor, model = detector
    rows = {"boxes": [[[10.0, 10.0, 10.0, 10.0]], [[2.0, 3.0, 20.0, 8.0]]], "categories": [[1], [2]],
            "image": [png(Image.new("RGB", (32, 32)))] * 2}
    batch = DetectionBatches(processor)(rows, [0, 1])
    outputs = predicted(model, [[([12, 10, 10, 10], 1, 5.0)], [([2, 3, 20, 8], 2, 5.0)]])
    scores = DetectionScores(processor, SHAPES)
    records = scores.records(outputs, batch, rows, [0, 1])
    assert records[0]["predicted_boxes"][0] == pytest.approx([12, 10, 10, 10], abs=1e-4)
    one_shifted = scores.metrics(records[:1])
    assert (one_shifted["eval_map"], one_shifted["eval_map_50"], one_shifted["eval_map_75"]) == pytest.approx((0.4, 1,
                                                                                                               0))
    # Per-category mean: the exact hit on category 2 scores 1 at every threshold.
    assert scores.metrics(records)["eval_map"] == pytest.approx((0.4 + 1) / 2)


def guesses(boxes: list[list[float]], categories: list[int], image_id: int) -> list[tuple[list[float], int, float]]:
    """A detector's plausible queries for one picture, seeded by the picture: each object found a few
    pixels off (sometimes as the wrong shape) with a random confidence, and a false find."""
    rng = np.random.default_rng(image_id)
    found = [([v + rng.uniform(-3, 3) for v in box[:2]] + box[2:], int(c if rng.random() < 0.8 else (c + 1) % 3),
              float(rng.normal())) for box, c in zip(boxes, categories)]
    return found + [([float(v) for v in rng.uniform(0, 16, 2)] + [8.0, 8.0], int(rng.integers(3)), float(rng.normal()))]


def test_detection_map_gathered_over_ranks_equals_one_process(data_cfg, detector):
    """Each of 2 ranks scores its share of the held-out pictures (as `eval_batches` deals them); the
    gathered records give the mAP of the whole set scored at once (COCO ranks every detection of the
    set by score, so per-rank mAPs would not average to it)."""
    processor, model = detector
    out = encode(DetectionEncoder(data_cfg, SHAPES, DATA), lines_of("detection_eval.jsonl")[:NUM_SCORED])
    rows = {k: out[k] for k in ("image", "boxes", "categories")}
    scores, make = DetectionScores(processor, SHAPES), DetectionBatches(processor)

    def scored(indices: list[int]) -> list[dict]:
        part = {k: [v[i] for i in indices] for k, v in rows.items()}
        outputs = predicted(model, [guesses(rows["boxes"][i], rows["categories"][i], i) for i in indices])
        return scores.records(outputs, make(part, indices), part, indices)

    whole = scores.metrics(scored(list(range(NUM_SCORED))))
    shards = [[r for b in eval_batches(NUM_SCORED, 4, rank,
                                       2) for r in scored([int(i) for i in b])] for rank in range(2)]
    assert scores.metrics(shards[0] + shards[1]) == pytest.approx(whole) and whole["eval_images"] == NUM_SCORED
    assert 0.05 < whole["eval_map"] < whole["eval_map_50"] < 1
    assert scores.metrics(shards[0])["eval_map"] != pytest.approx(whole["eval_map"])  # the shards see different things
    with pytest.raises(ValueError, match="gathered twice"):
        scores.metrics(shards[0] + shards[1] + shards[0][:1])


# ---------------------------------------------------------------- segmentation


@pytest.fixture(scope="module")
def segmenter():
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    return (AutoImageProcessor.from_pretrained(MODELS / "tiny-segformer", backend="pil"),
            AutoModelForSemanticSegmentation.from_pretrained(MODELS / "tiny-segformer").eval())


def test_bad_masks_are_named(data_cfg, tmp_path):
    ids = np.zeros((32, 32), dtype=np.uint8)
    ids[4:8, 4:8], ids[0, 0] = 3, 255  # a triangle's pixels and one unlabelled pixel
    palette = Image.fromarray(ids, "L").convert("P")
    palette.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [255, 255, 255] * 252)
    files = {"ok.png": Image.fromarray(ids, "L"), "palette.png": palette,
             "rgb.png": Image.new("RGB", (32, 32)), "small.png": Image.new("L", (30, 32)),
             "unknown.png": Image.fromarray(np.full((32, 32), 7, dtype=np.uint8), "L")}
    for name, image in files.items():
        image.save(tmp_path / name)
    picture = str(DATA / "images/eval/0000.png")
    cases = {"ok.png": None, "palette.png": None, "rgb.png": "mask_not_single_channel",
             "small.png": "mask_size_mismatch", "unknown.png": "unknown_class_id", "none.png": "missing_image"}
    lines = [json.dumps({"image": picture, "mask": name}) for name in cases] + [json.dumps({"image": picture})]
    out = encode(SegmentationEncoder(data_cfg, CLASSES, tmp_path), lines)
    assert reasons(out) == [*cases.values(), "missing_field"], out["detail"]
    assert "30x32, the image 32x32" in out["detail"][3] and "[7]" in out["detail"][4]
    from sft_dist.data.segmentation import class_ids

    assert (class_ids(out["mask"][1]) == ids).all()  # the palette's indices, not its colours


def test_segmentation_counts_summed_over_ranks_equal_torchmetrics_on_the_whole_set(data_cfg, segmenter):
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    processor, model = segmenter
    out = encode(SegmentationEncoder(data_cfg, CLASSES, DATA), lines_of("segmentation_eval.jsonl")[:NUM_SCORED])
    batch = SegmentationBatches(processor)({k: out[k] for k in ("image", "mask")})
    assert batch["labels"].shape == (NUM_SCORED, 32, 32) and batch["labels"][0].tolist() == \
        np.asarray(Image.open(DATA / "masks/eval/0000.png")).tolist()
    batch["labels"][:8, :4] = 255  # unlabelled pixels count nowhere
    torch.manual_seed(0)
    with torch.no_grad():
        model.decode_head.classifier.bias.normal_(0, 1)  # predictions of every class
        logits = model(pixel_values=batch["pixel_values"]).logits
        whole_loss = model(**batch).loss
    counter = SegmentationCounts(len(CLASSES))
    totals = sum(counter.counts(logits[i], batch["labels"][i]) for rank in range(2)
                 for i in [torch.as_tensor(b) for b in eval_batches(NUM_SCORED, 4, rank, 2)])
    metrics = counter.metrics(totals.tolist())
    predicted = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False).argmax(1)
    iou = MulticlassJaccardIndex(len(CLASSES), average="macro", ignore_index=255)(predicted, batch["labels"])
    accuracy = MulticlassAccuracy(len(CLASSES), average="micro", ignore_index=255)(predicted, batch["labels"])
    assert metrics["eval_mean_iou"] == pytest.approx(iou.item(), abs=1e-6)
    assert metrics["eval_pixel_accuracy"] == pytest.approx(accuracy.item(), abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(whole_loss.item(), rel=1e-5)
    assert metrics["eval_pixels"] == NUM_SCORED * 32 * 32 - 8 * 4 * 32


def test_mean_iou_by_hand():
    # targets 0 0 0 1, predictions 0 0 1 1; class 2 appears in neither and is left out.
    confusion = torch.tensor([[2.0, 1, 0], [0, 1, 0], [0, 0, 0]])
    assert mean_iou(confusion) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_the_tiny_models_load_and_answer_in_their_pipelines():
    """What the tasks' exports must do: the shipped folders already work in transformers' pipelines."""
    from transformers import pipeline

    picture = Image.open(DATA / "images/eval/0000.png").convert("RGB")
    chat = pipeline("image-text-to-text", model=str(MODELS / "tiny-vlm"))
    question = [{"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": "What colour is the square?"}]}]
    assert isinstance(chat(text=question, max_new_tokens=2, return_full_text=False)[0]["generated_text"], str)
    found = pipeline("object-detection", model=str(MODELS / "tiny-detector"))(picture, threshold=0.0)
    assert found and {f["label"] for f in found} <= set(SHAPES)
    segments = pipeline("image-segmentation", model=str(MODELS / "tiny-segformer"))(picture)
    assert {s["label"] for s in segments} <= set(CLASSES) and segments[0]["mask"].size == (32, 32)
