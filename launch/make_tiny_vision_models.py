"""Build the tiny random-weight vision models of the VLM, detection and segmentation tests and configs:
configs/models/tiny-vlm/, tiny-detector/, tiny-segformer/ (config, weights, processor).

    python launch/make_shapes_data.py           # the VLM's tokenizer is trained on its questions
    python launch/make_tiny_vision_models.py [--out DIR] [--only vlm|detector|segformer]

- tiny-vlm: LLaVA (`LlavaForConditionalGeneration`, what `AutoModelForImageTextToText` and
  `pipeline("image-text-to-text")` load): a CLIP vision tower on 32x32 images in 8x8 patches (16 image
  tokens, CLS dropped) joined by LLaVA's projector to a Llama language model with tied embeddings;
  its processor (`LlavaProcessor`: CLIP's image processor, a byte-level BPE tokenizer with `<image>`
  as a special token, a ChatML chat template that renders transformers' content parts and plain
  strings alike). ~125k parameters.
- tiny-detector: Conditional DETR (`AutoModelForObjectDetection`) on a 2-stage transformers ResNet (no
  timm), its image processor resizing the 32x32 pictures to 64x64 (an 8x8 feature map); plain DETR
  and YOLOS of the same size hardly move mAP in a minute of CPU, Conditional DETR's sigmoid focal loss
  and conditional queries do. ~150k parameters, 10 queries, labels square, circle, triangle.
- tiny-segformer: SegFormer (`AutoModelForSemanticSegmentation`), 2 encoder blocks of width 16 and 32,
  labels background, square, circle, triangle. ~22k parameters.

The image processors are transformers' PIL implementations' settings saved under the model type's
own class name, so they load with or without torchvision. Deterministic: rerunning gives identical files.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    ConditionalDetrImageProcessor,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ResNetConfig,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from staged_folder import staged_folder  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "configs" / "models"
VLM_TRAIN_DATA = REPO_ROOT / "configs" / "data" / "shapes" / "vlm_train.jsonl"
IMAGE_SIZE = 32
SHAPES = ["square", "circle", "triangle"]
SEGMENT_CLASSES = ["background", *SHAPES]
# The picture's colours as they are (mean 0.5, std 0.5 maps [0, 255] to [-1, 1]).
NORMALISE = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# ChatML. A turn's content is a string, or transformers' / OpenAI's content parts: an image part
# (`image`, `image_url`) renders as the image token (the processor expands it to one token per
# patch), a text part as its text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def labels_of(names: list[str]) -> dict:
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}


# ---------------------------------------------------------------- VLM


def vlm_corpus() -> list[str]:
    texts = ["system\n", "user\n", "assistant\n"]
    with VLM_TRAIN_DATA.open() as f:
        for line in f:
            texts += [m["content"].replace("<image>", "") for m in json.loads(line)["messages"]]
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(vlm_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=512,
                                   extra_special_tokens={"image_token": "<image>"})


def build_vlm(tok: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    torch.manual_seed(0)  # the only source of randomness in the weights
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    return model


def vlm_processor(tok: PreTrainedTokenizerFast) -> LlavaProcessor:
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                               "width": IMAGE_SIZE},
                                **NORMALISE)
    # 16 patches + CLS from the tower, CLS dropped by the "default" feature selection: 16 image tokens.
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def write_vlm(out: Path) -> int:
    tok = build_tokenizer()
    model = build_vlm(tok)
    model.save_pretrained(out, safe_serialization=True)
    vlm_processor(tok).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- detector and segmenter


def write_detector(out: Path) -> int:
    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    config = ConditionalDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                   d_model=48, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=96,
                                   decoder_ffn_dim=96, encoder_attention_heads=4, decoder_attention_heads=4,
                                   num_queries=10, dropout=0.0, **labels_of(SHAPES))
    torch.manual_seed(0)
    model = ConditionalDetrForObjectDetection(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    side = 2 * IMAGE_SIZE  # the backbone's stride is 8: an 8x8 feature map
    ConditionalDetrImageProcessor(size={"shortest_edge": side, "longest_edge": side}, **NORMALISE).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def write_segformer(out: Path) -> int:
    config = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16,
                                                                                                                  32],
                             patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=32, **labels_of(SEGMENT_CLASSES))
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    SegformerImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_reduce_labels=False,
                            **NORMALISE).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


BUILDERS = {"vlm": ("tiny-vlm", write_vlm), "detector": ("tiny-detector", write_detector),
            "segformer": ("tiny-segformer", write_segformer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the folder the model folders go into")
    parser.add_argument("--only", choices=sorted(BUILDERS))
    args = parser.parse_args()
    for key, (name, write) in BUILDERS.items():
        if args.only in (None, key):
            with staged_folder(args.out / name) as staging:
                num_params = write(staging)
            print(f"wrote {args.out / name}: {num_params:,} parameters")


if __name__ == "__main__":
    main()
