"""Conversations about images for `image_text_to_text` (vision-language models): on the driver, each
row's images are read and checked to decode, and the conversation is rendered through the processor's
chat template, its image placeholders expanded and tokenized by the processor itself, and only the
assistant turns supervised (image tokens never); on the workers, each batch's images become the
processor's pixel values. Imports neither Ray nor DeepSpeed.

Rows come in the shapes users bring:
- `{"messages": [...], "images": [...]}` with `<image>` placeholders in the turns' strings, taken by the
  `images` list in order (LLaMA-Factory, ms-swift);
- content parts, OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` or transformers'
  `{"type": "image", "image" | "url" | "path": ...}` beside `{"type": "text", "text": ...}`; an image
  part without a value takes the next of the `images` list (datasets that keep images in a column).
An image is a path (relative to the data file), the bytes of an image file, a `datasets` Image value, or
a `data:` URL; web addresses are refused (nothing is fetched while preparing data).

Every turn is handed to the template as content parts, image parts as `{"type": "image"}`: the form
`processor.apply_chat_template` and `pipeline("image-text-to-text")` give it, so training renders as
inference does. The expansion of each image into its tokens (a fixed count for LLaVA, a size-dependent
one for Qwen2-VL or LLaVA-NeXT, with begin/end markers for others) is the processor's own: its
`__call__` runs on the driver and only its token ids are kept. That costs one image-processor pass per
image while preparing, paid for correctness on every model family; the pixel values are made again per
batch on the workers (a few KB of PNG per image saved, not hundreds of KB of floats).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

import datasets
import torch

from sft_dist.config import ROLES, DataConfig
from sft_dist.data.badrows import BadRow
from sft_dist.data.batches import collate
from sft_dist.data.chat import IGNORE_INDEX, render_with_spans
from sft_dist.data.encode import FEATURES, _labels, drop, raw_row
from sft_dist.data.images import check_decodes, decoded, file_bytes, part_folder

VLM_FEATURES = datasets.Features({**FEATURES, "images": datasets.List(datasets.Value("binary"))})
PLACEHOLDER = "<image>"  # the data's placeholder (LLaMA-Factory's), whatever the model's image token is
IMAGE_PART_KEYS = ("image", "url", "path")  # where transformers' image parts keep the image


class VlmEncoder:
    """What `datasets.map` runs over `image_text_to_text` rows of one data file (`folder`: where its
    relative image paths start). `processor`: the model's (AutoProcessor), with its chat template."""

    features = VLM_FEATURES

    def __init__(self, data: DataConfig, processor: Any, template: str | None = None, folder: Path | None = None):
        self.data, self.processor, self.folder = data, processor, folder
        self.template = template or getattr(processor, "chat_template", None)
        self.image_ids = {i for i in getattr(processor, "image_token_ids", [processor.image_token_id]) if i is not None}

    def for_part(self, part_name: str) -> VlmEncoder:
        return VlmEncoder(self.data, self.processor, self.template, part_folder(part_name))

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {name: [None] * len(indices) for name in VLM_FEATURES}
        for j in range(len(indices)):
            out["line"][j], out["row"][j] = (batch["_line"][j] if "_json" in batch else None), indices[j]
            try:
                messages, images = self.conversation(raw_row(batch, j))
                ids, labels = self.tokens(messages, images)
                self._keep(out, j, ids, labels, messages, images)
            except BadRow as bad:
                drop(out, j, bad.reason, bad.detail, bad=True)
        return out

    # ---------------------------------------------------------------- rows to conversations

    def conversation(self, row: Any) -> tuple[list[dict], list[bytes]]:
        """The row's turns as content parts (images as `{"type": "image"}`, in order) and its images' bytes."""
        if not isinstance(row, dict):
            raise BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}")
        field, images_field = self._field("messages"), self._field("images")
        turns = row.get(field)
        if not isinstance(turns, list) or not turns:
            raise BadRow("missing_field" if turns is None else "wrong_type",
                         f"'{field}' must be a non-empty list of turns")
        listed = row.get(images_field) or []
        if not isinstance(listed, list):
            raise BadRow("wrong_type", f"'{images_field}' is {type(listed).__name__}, expected a list of images")
        pending, images = iter(listed), []
        messages = [self._turn(turn, i, pending, images) for i, turn in enumerate(turns)]
        if next(pending, None) is not None:
            raise BadRow("image_count_mismatch", f"'{images_field}' has {len(listed)} images, more than the turns "
                         f"place ({PLACEHOLDER} placeholders and image parts without an image)")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("no_assistant_turn", "the conversation has no assistant turn to learn from")
        return messages, images

    def _field(self, name: str) -> str:
        return self.data.fields.get(name, name)

    def _turn(self, turn: Any, i: int, pending: Any, images: list[bytes]) -> dict:
        role_key, content_key, field = self._field("role"), self._field("content"), self._field("messages")
        if not isinstance(turn, dict) or turn.get(role_key) is None or content_key not in turn:
            raise BadRow("missing_field", f"{field}[{i}] needs '{role_key}' and '{content_key}'")
        role = self.data.roles.get(turn[role_key], turn[role_key])
        if role not in ROLES:
            raise BadRow("unknown_role", f"{field}[{i}].{role_key} is {turn[role_key]!r}; expected one of "
                         f"{ROLES} (map other names with data.roles)")
        where = f"{field}[{i}].{content_key}"
        parts = self._parts(turn[content_key], where, pending, images)
        if role != "user" and any(p["type"] == "image" for p in parts):
            raise BadRow("image_outside_user_turn", f"{where}: images go in user turns (a {role} turn has one)")
        return {"role": role, "content": parts}

    def _parts(self, content: Any, where: str, pending: Any, images: list[bytes]) -> list[dict]:
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise BadRow("wrong_type", f"{where} is {type(content).__name__}, expected a string or content parts")
        parts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts += self._placeholders(part["text"], f"{where}[{k}]", pending, images)
            elif kind in ("image", "image_url"):
                images.append(self._image(_image_value(part, pending), f"{where}[{k}]"))
                parts.append({"type": "image"})
            else:
                raise BadRow("bad_content_part",
                             f"{where}[{k}]: expected a text, image or image_url part, got {part!r:.80}")
        return parts

    def _placeholders(self, text: str, where: str, pending: Any, images: list[bytes]) -> list[dict]:
        """A text with `<image>` placeholders as text and image parts, each placeholder taking the next image."""
        parts = []
        for k, piece in enumerate(text.split(PLACEHOLDER)):
            if k:
                value = next(pending, None)
                if value is None:
                    raise BadRow("image_count_mismatch", f"{where}: more {PLACEHOLDER} placeholders than "
                                 f"'{self._field('images')}' has images")
                images.append(self._image(value, where))
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def _image(self, value: Any, where: str) -> bytes:
        data = _data_url_bytes(value, where) if isinstance(value, str) and value.startswith("data:") else None
        if isinstance(value, str) and value.split("://", 1)[0] in ("http", "https"):
            raise BadRow("remote_image", f"{where}: {value:.80} is a web address; images are not fetched while "
                         "preparing data (download them and name the files)")
        data = data if data is not None else file_bytes(value, where, self.folder)
        check_decodes(data, where)
        return data

    # ---------------------------------------------------------------- conversations to tokens

    def tokens(self, messages: list[dict], images: list[bytes]) -> tuple[list[int], list[int]]:
        """Token ids and labels: the processor's own expansion of the rendered conversation; the
        assistant turns supervised (everything with data.loss_on: all), image tokens never."""
        if self.template is None:
            raise BadRow("no_chat_template", "a conversation needs a chat template; the processor has none")
        text, spans = render_with_spans(self.processor.tokenizer, self.template, messages, self.data.loss_on)
        encoded = self.processor(text=[text], images=[decoded(b) for b in images] or None, add_special_tokens=False,
                                 return_offsets_mapping=True, return_text_replacement_offsets=True)
        moved = [_shifted(span, encoded["text_replacement_offsets"][0]) for span in spans]
        ids, labels = _labels(encoded["input_ids"][0], encoded["offset_mapping"][0], moved)
        return ids, [IGNORE_INDEX if i in self.image_ids else label for i, label in zip(ids, labels)]

    def _keep(self, out: dict, j: int, ids: list[int], labels: list[int], messages: list[dict],
              images: list[bytes]) -> None:
        full_length, limit = len(ids), self.data.max_seq_len
        if full_length > limit:
            cuts_image = any(i in self.image_ids for i in ids[limit:])
            if self.data.truncation == "drop" or cuts_image:
                why = " and would cut an image's tokens" if cuts_image and self.data.truncation == "right" else ""
                drop(out, j, "too_long", f"{full_length} tokens > data.max_seq_len {limit}{why}")
                out["length"][j] = full_length
                return
            ids, labels = ids[:limit], labels[:limit]
        num_supervised = sum(label != IGNORE_INDEX for label in labels[1:])  # position 0 predicts nothing
        if num_supervised == 0:
            drop(out, j, "no_supervised_tokens", "no supervised token left (after truncation)")
            return
        out["input_ids"][j], out["labels"][j] = ids, labels
        out["num_supervised"][j], out["images"][j] = num_supervised, images
        out["length"][j], out["truncated"][j], out["bad"][j] = len(ids), full_length > len(ids), False
        out["heldout_u"][j] = _uniform(messages, images)


def _image_value(part: dict, pending: Any) -> Any:
    """An image part's image: OpenAI's image_url (a dict with `url`, or a string), transformers' `image`,
    `url` or `path`; none of them: the next of the row's `images` list."""
    if part["type"] == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in IMAGE_PART_KEYS:
        if part.get(key) is not None:
            return part[key]
    return next(pending, None)


def _data_url_bytes(value: str, where: str) -> bytes:
    header, _, payload = value.partition(",")
    if not header.endswith(";base64"):
        raise BadRow("unreadable_image", f"{where}: a data: URL must be base64 ({header[:40]})")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise BadRow("unreadable_image", f"{where}: a data: URL's base64 does not decode ({err})") from None


def _shifted(span: tuple[int, int], replacements: list[dict]) -> tuple[int, int]:
    """A character span of the rendered text, in the text with its image tokens expanded."""
    def moved(position: int) -> int:
        return position + sum(r["new_span"][1] - r["new_span"][0] - (r["span"][1] - r["span"][0])
                              for r in replacements if r["span"][1] <= position)
    return moved(span[0]), moved(span[1])


def _uniform(messages: list[dict], images: list[bytes]) -> float:
    """A number in [0, 1) fixed by the conversation and its images' content (the held-out split): the
    same question about another picture is another example."""
    digest = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=8)
    for data in images:
        digest.update(hashlib.blake2b(data, digest_size=8).digest())
    return int.from_bytes(digest.digest(), "big") / 2**64


# ---------------------------------------------------------------- batches (workers)


class VlmBatches:
    """Saved VLM rows as model inputs: padded tokens and labels, and the processor's pixel values (and
    whatever else its image processor gives the model, e.g. image sizes) of the batch's images in order."""

    def __init__(self, processor: Any, pad_id: int, dtype: torch.dtype = torch.float32):
        self.processor, self.pad_id, self.dtype = processor, pad_id, dtype

    def __call__(self, rows: dict[str, list], indices: Any = None, step: int | None = None) -> dict[str, torch.Tensor]:
        batch = collate({"input_ids": rows["input_ids"], "labels": rows["labels"]}, self.pad_id)
        images = [decoded(data) for row in rows["images"] for data in row]
        if images:
            pixels = self.processor(images=images, return_tensors="pt")
            for key, value in pixels.items():
                batch[key] = value.to(self.dtype) if torch.is_floating_point(value) else value
        return batch

