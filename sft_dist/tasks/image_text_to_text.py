"""Vision-language chat SFT: conversations whose user turns carry images (`<image>` placeholders with an
`images` list, or content parts); the next-token loss on the assistant turns, image tokens never
supervised (sft_dist.data.vlm). The model is transformers' AutoModelForImageTextToText (LLaVA-style:
a vision tower, a projector, a language model) and reads its AutoProcessor; `model.freeze_vision`
keeps the vision tower as it is."""

from __future__ import annotations

from typing import Any

from sft_dist.tasks import Task
from sft_dist.tasks.causal_lm import token_counts, token_loss


def vlm_encoder(data: Any, tokenizer: Any, template: str | None, labels: list[str] | None) -> Any:
    from sft_dist.data.vlm import VlmEncoder
    from sft_dist.modeling import model as model_lib

    # The tokenizer the driver loaded names the model folder; the encoder needs the whole processor
    # (the image token expansion is the processor's own).
    return VlmEncoder(data, model_lib.load_processor(tokenizer.name_or_path))


def vlm_batches(cfg: Any, tokenizer: Any, module: Any) -> Any:
    from sft_dist.data.vlm import VlmBatches
    from sft_dist.modeling import model as model_lib

    dtype = next(module.parameters()).dtype
    return VlmBatches(model_lib.load_processor(cfg.model.name_or_path, cfg.model.trust_remote_code),
                      tokenizer.pad_token_id, dtype)


TASK = Task(
    name="image_text_to_text", auto_class="AutoModelForImageTextToText", pipeline="image-text-to-text",
    # messages with `<image>` placeholders (LLaMA-Factory, ms-swift) or image parts; images: the row's images.
    formats={"image_messages": ("messages", "role", "content", "images")},
    metrics={"eval_loss": "min", "eval_ppl": "min", "eval_token_acc": "max"},
    encoder=vlm_encoder, batches=vlm_batches, loss=token_loss, counts=token_counts,
    preprocessor="processor", labels_are_tokens=True,
)
