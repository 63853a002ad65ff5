"""Build the tiny random-weight ViT image encoder used by the image tests and configs/image-tiny.yaml:
configs/models/tiny-vit/ (config, weights, image processor).

    python launch/make_tiny_vit.py [--out DIR]

A ViT body without a head (as a pretrained checkpoint is: `image_classification` adds and initialises
the classifier), 32x32 inputs in 8x8 patches, 2 layers of width 32: ~24k parameters, so a training step
takes milliseconds. Its image processor is ViT's own (resize to 32x32, scale, normalise), saved as
preprocessor_config.json. Deterministic: rerunning gives byte-identical files.
"""

import argparse
from pathlib import Path

import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "configs" / "models" / "tiny-vit"
IMAGE_SIZE = 32


def build_model() -> ViTModel:
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)  # the only source of randomness in the weights
    return ViTModel(config, add_pooling_layer=False).to(torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    model = build_model()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor.save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main()
