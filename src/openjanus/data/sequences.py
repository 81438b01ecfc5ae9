"""Training sequences for the autoregressive model: token ids, shifted targets and the image slots.

Samples use exactly the strings the pipeline uses at inference: understanding and chat text go
through `render_conversation` (default system prompt), image prompts through
`image_generation_prompt`, and a dropped caption is `generation.decode.unconditional_ids`'s row.
Batches are right-padded, so plain causal attention never lets a real token see padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from ..processing.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat, image_generation_prompt, render_conversation
from ..processing.image import preprocess_image
from ..processing.inputs import normalize_message
from ..processing.tokenizer import IMAGE_TOKEN, JanusTokenizer
from .shapes import ConversationExample, GenerationExample, TextExample

IGNORE_INDEX = -100
KINDS = ("understanding", "text", "generation")


@dataclass
class TokenSample:
    """One sequence: ids, next-token targets (IGNORE_INDEX where unsupervised) and its images.

    Understanding images fill the `<image_placeholder>` ids in order; a generation image is
    tokenised by the VQ model and its codes follow `ids` (they are the supervised part).
    """

    ids: list[int]
    targets: list[int]
    kind: str
    images: list[Image.Image] = field(default_factory=list)
    generation_image: Image.Image | None = None


def _shifted(ids: list[int], supervised: list[bool]) -> list[int]:
    """targets[t] = ids[t + 1] where token t + 1 is supervised."""
    return [ids[t + 1] if supervised[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def _images_per_turn(example: ConversationExample) -> list[list[Image.Image]]:
    """The images of each turn: one per `<image_placeholder>` in order, or all before the first question."""
    marks = [message["content"].count(IMAGE_TOKEN) for message in example.messages]
    images = list(example.images)
    if not sum(marks):
        first_user = next((i for i, m in enumerate(example.messages) if m["role"] == "user"), None)
        return [images if index == first_user else [] for index in range(len(marks))]
    if sum(marks) != len(images):
        raise ValueError(f"the conversation has {sum(marks)} {IMAGE_TOKEN} marks for {len(images)} images")
    per_turn, taken = [], 0
    for count in marks:
        per_turn.append(images[taken:taken + count])
        taken += count
    return per_turn


def encode_conversation(tokenizer: JanusTokenizer, fmt: ChatFormat, example: ConversationExample,
                        image_tokens: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> TokenSample:
    """Chat-formatted ids with the loss on assistant answers (and their EOS) only.

    Each assistant turn is tokenised separately after the prompt that precedes it, which is the
    string the pipeline feeds before generating that answer.
    """
    images = list(example.images)
    messages = []
    for index, (message, attached) in enumerate(zip(example.messages, _images_per_turn(example))):
        text_message, _ = normalize_message({"role": message["role"], "content": message["content"],
                                             "images": attached}, index)
        messages.append(text_message)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with an assistant answer")

    ids: list[int] = []
    supervised: list[bool] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.encode(render_conversation(messages[:index], fmt, system_prompt))
        if prompt[:len(ids)] != ids:
            raise ValueError("the tokenizer splits this conversation differently as it grows; cannot mask answers")
        answer = tokenizer.encode(" " + message["content"].strip(), add_bos=False) + [tokenizer.eos_id]
        supervised += [False] * (len(prompt) - len(ids)) + [True] * len(answer)
        ids = prompt + answer
    expanded_ids, expanded_supervised = [], []
    for token, flag in zip(ids, supervised):
        if token == tokenizer.image_id:
            expanded_ids += [tokenizer.boi_id] + [tokenizer.image_id] * image_tokens + [tokenizer.eoi_id]
            expanded_supervised += [False] * (image_tokens + 2)
        else:
            expanded_ids.append(token)
            expanded_supervised.append(flag)
    kind = "understanding" if images else "text"
    return TokenSample(expanded_ids, _shifted(expanded_ids, expanded_supervised), kind, images)


def encode_text(tokenizer: JanusTokenizer, example: TextExample) -> TokenSample:
    """BOS + text + EOS, supervised on every token after BOS."""
    ids = tokenizer.encode(example.text) + [tokenizer.eos_id]
    return TokenSample(ids, _shifted(ids, [True] * len(ids)), "text")


def drop_condition(ids: list[int], pad_id: int) -> list[int]:
    """The unconditional prompt: every token between BOS and the final <begin_of_image> becomes pad."""
    return [ids[0]] + [pad_id] * (len(ids) - 2) + [ids[-1]]


def encode_generation(tokenizer: JanusTokenizer, fmt: ChatFormat, example: GenerationExample,
                      unconditional: bool = False) -> TokenSample:
    """The image prompt ending in <begin_of_image>; the loss is on the image codes that follow."""
    ids = tokenizer.encode(image_generation_prompt(example.prompt, fmt))
    if unconditional:
        ids = drop_condition(ids, tokenizer.pad_id)
    return TokenSample(ids, [IGNORE_INDEX] * len(ids), "generation", generation_image=example.image)


def square_image(image: Image.Image, image_size: int) -> torch.Tensor:
    """Generation-path pixels: centre-crop to a square, resize, scale to [-1, 1] (3, S, S)."""
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return preprocess_image(image, image_size)


@dataclass
class JanusBatch:
    """A right-padded mixed batch (understanding, text and generation rows)."""

    input_ids: torch.Tensor  # (B, T); pad at the end and at code positions
    text_targets: torch.Tensor  # (B, T) next-token targets through lm_head, IGNORE_INDEX elsewhere
    kinds: torch.Tensor  # (B,) index into KINDS
    image_mask: torch.Tensor  # (B, T) positions taking understanding features
    code_input_mask: torch.Tensor  # (B, T) positions whose input is an image code (all codes but the last)
    code_target_mask: torch.Tensor  # (B, T) positions whose hidden state predicts the next image code
    pixel_values: torch.Tensor  # (N, 3, S, S) understanding images in row order (N may be 0)
    generation_pixels: torch.Tensor  # (G, 3, S, S) images to tokenise, in row order (G may be 0)
    num_tokens: int  # real (non-padding) positions

    def to(self, device) -> JanusBatch:
        """The batch on `device`."""
        moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value
                 for name, value in self.__dict__.items()}
        return JanusBatch(**moved)

    @property
    def num_targets(self) -> int:
        """Supervised positions: text targets plus image codes."""
        return int((self.text_targets != IGNORE_INDEX).sum()) + int(self.code_target_mask.sum())


def _stack(images: list[Image.Image], preprocess, image_size: int) -> torch.Tensor:
    """(N, 3, S, S) pixels; N may be 0, so that every batch runs both image paths."""
    if not images:
        return torch.empty(0, 3, image_size, image_size)
    return torch.stack([preprocess(image, image_size) for image in images])


def collate(samples: list[TokenSample], pad_id: int, image_id: int, image_size: int,
            num_image_tokens: int) -> JanusBatch:
    """Right-pad samples into one batch; generation rows get room for their image codes."""
    lengths = [len(s.ids) + (num_image_tokens - 1 if s.generation_image is not None else 0) for s in samples]
    rows, length = len(samples), max(lengths)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    text_targets = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    code_input_mask = torch.zeros((rows, length), dtype=torch.bool)
    code_target_mask = torch.zeros((rows, length), dtype=torch.bool)
    understanding_images, generation_images = [], []
    for row, sample in enumerate(samples):
        prompt_length = len(sample.ids)
        input_ids[row, :prompt_length] = torch.tensor(sample.ids)
        text_targets[row, :prompt_length] = torch.tensor(sample.targets)
        understanding_images += sample.images
        if sample.generation_image is not None:
            generation_images.append(sample.generation_image)
            code_input_mask[row, prompt_length:prompt_length + num_image_tokens - 1] = True
            code_target_mask[row, prompt_length - 1:prompt_length - 1 + num_image_tokens] = True
    image_mask = (input_ids == image_id) & ~code_input_mask
    pixel_values = _stack(understanding_images, preprocess_image, image_size)
    generation_pixels = _stack(generation_images, square_image, image_size)
    kinds = torch.tensor([KINDS.index(s.kind) for s in samples], dtype=torch.long)
    return JanusBatch(input_ids, text_targets, kinds, image_mask, code_input_mask, code_target_mask,
                      pixel_values, generation_pixels, sum(lengths))
