"""Model inputs from conversations and prompts: image placeholders expanded, left-padded batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .chat import ChatFormat, image_generation_prompt, render_conversation
from .image import load_image, preprocess_images
from .tokenizer import IMAGE_TOKEN, JanusTokenizer


@dataclass
class Batch:
    """Left-padded token ids with the mask of real tokens and, for understanding, the images."""

    input_ids: torch.Tensor  # (B, T)
    padding_mask: torch.Tensor  # (B, T) bool, False on left padding
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S)
    image_mask: torch.Tensor | None = None  # (B, T) bool, positions that take image features

    def to(self, device) -> Batch:
        def move(tensor):
            return None if tensor is None else tensor.to(device)

        return Batch(move(self.input_ids), move(self.padding_mask), move(self.pixel_values), move(self.image_mask))


def normalize_message(message: Mapping[str, Any], index: int) -> tuple[dict[str, str], list[Any]]:
    """A chat message as {'role', 'content'} text with `<image_placeholder>` marks, and its images.

    `content` is a str (images from an optional `images` list go where the
    text has `<image_placeholder>`, or before the text when it has none) or a
    list of parts `{"type": "text", "text": ...}` / `{"type": "image", "image": ...}`.
    """
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"message {index} must be a dict with 'role' and 'content'")
    content = message.get("content", "")
    images = list(message.get("images") or [])
    if isinstance(content, str):
        marks = content.count(IMAGE_TOKEN)
        if marks == 0 and images:
            content = "".join(IMAGE_TOKEN + "\n" for _ in images) + content
        elif marks != len(images):
            raise ValueError(f"message {index} has {marks} {IMAGE_TOKEN} marks for {len(images)} images")
    elif isinstance(content, Sequence):
        if images:
            raise ValueError(f"message {index}: give images either as content parts or in 'images', not both")
        text = ""
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                text += str(part.get("text", ""))
            elif kind == "image":
                images.append(part.get("image"))
                text += IMAGE_TOKEN + "\n"
            else:
                raise ValueError(f"message {index}: content parts must be of type 'text' or 'image'")
        content = text
    else:
        raise ValueError(f"message {index} content must be a str or a list of parts")
    if images and message["role"] != "user":
        raise ValueError(f"message {index}: only user messages may carry images")
    return {"role": message["role"], "content": content}, images


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row):] = True
    return ids, mask


def understanding_batch(conversations: Sequence[Sequence[Mapping[str, Any]]], tokenizer: JanusTokenizer,
                        fmt: ChatFormat, image_size: int, image_tokens: int,
                        system_prompt: str | None = None) -> Batch:
    """Tokenised, image-expanded, left-padded batch for text answers."""
    rows, images = [], []
    for conversation in conversations:
        messages = []
        for index, message in enumerate(conversation):
            text_message, message_images = normalize_message(message, index)
            messages.append(text_message)
            images.extend(message_images)
        kwargs = {} if system_prompt is None else {"system_prompt": system_prompt}
        ids = tokenizer.encode(render_conversation(messages, fmt, **kwargs))
        expanded: list[int] = []
        for token in ids:
            if token == tokenizer.image_id:
                expanded += [tokenizer.boi_id] + [tokenizer.image_id] * image_tokens + [tokenizer.eoi_id]
            else:
                expanded.append(token)
        rows.append(expanded)
    input_ids, padding_mask = _left_pad(rows, tokenizer.pad_id)
    pixel_values = preprocess_images([load_image(i) for i in images], image_size) if images else None
    image_mask = (input_ids == tokenizer.image_id) & padding_mask
    return Batch(input_ids, padding_mask, pixel_values, image_mask)


def generation_batch(prompts: Sequence[str], tokenizer: JanusTokenizer, fmt: ChatFormat) -> Batch:
    """Left-padded prompts ending in <begin_of_image>, ready for image-token generation."""
    rows = [tokenizer.encode(image_generation_prompt(p, fmt)) for p in prompts]
    input_ids, padding_mask = _left_pad(rows, tokenizer.pad_id)
    return Batch(input_ids, padding_mask)
