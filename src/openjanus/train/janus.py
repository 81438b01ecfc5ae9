"""The autoregressive trainer: LLM text pretraining and Janus stages I-III are this one task.

A stage differs only by its config: which components train (stage I: adaptors and heads;
stage II: the LLM too; stage III: SigLIP too; the VQ model is always frozen), the mixture of
understanding, text and generation samples, and their formats (plain text or chat).

One loss: next-token cross-entropy, through `lm_head` on supervised text tokens (answers, or
all of plain text) and through `gen_head` on image codes, averaged over every supervised
token of the global batch (optionally weighted per kind). Generation samples are teacher
forced: codes of the frozen VQ model enter through `embed_image_tokens`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.files import JsonlDataset
from ..data.mixture import Mixture
from ..data.sequences import (
    IGNORE_INDEX,
    KINDS,
    JanusBatch,
    collate,
    encode_conversation,
    encode_generation,
    encode_text,
)
from ..data.shapes import (
    ConversationExample,
    GenerationExample,
    ShapesGeneration,
    ShapesText,
    ShapesUnderstanding,
    TextExample,
    example_rng,
)
from ..model import JanusModel
from ..processing.chat import chat_format_for
from .tasks import LossOutput, Task, transformer_activation_bytes

# Generation images reach the frozen VQ encoder channels-last: oneDNN's bf16 convolutions then skip a
# re-layout per layer (encoding about 1.9x faster on the CPU; benchmarks/train_step.py). The codes differ
# from NCHW's only where bf16 rounding tips them, as they do between machines.
GENERATION_PIXELS_FORMAT = torch.channels_last


class JanusObjective(nn.Module):
    """Mixed-batch next-token loss of a JanusModel."""

    def __init__(self, model: JanusModel, kind_weights: dict[str, float], fp32_image_codes: bool = False):
        super().__init__()
        self.model = model
        self.fp32_image_codes = fp32_image_codes
        self.register_buffer("kind_weights", torch.tensor([kind_weights.get(k, 1.0) for k in KINDS]),
                             persistent=False)

    def input_embeddings(self, batch: JanusBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings with understanding features and image-code embeddings in place; and the codes.

        Both image paths run even on empty image batches, so every process calls the same modules
        in the same order (FSDP gathers parameters per module call).
        """
        model = self.model
        embeds = model.embed_text(batch.input_ids)
        # Cast explicitly: under autocast the features come out in bf16 while embeddings stay fp32.
        features = model.embed_images(batch.pixel_values).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter(batch.image_mask[..., None], features.to(embeds.dtype))
        # By default encoding runs under the stage's precision (bf16 halves its cost on CPUs). bf16 flips
        # many codes of a small VQ, yet float32 codes scored worse for shapes-tiny (its model card).
        pixels = batch.generation_pixels.contiguous(memory_format=GENERATION_PIXELS_FORMAT)
        precision = (torch.autocast(pixels.device.type, enabled=False) if self.fp32_image_codes
                     else contextlib.nullcontext())
        with torch.no_grad(), precision:
            codes = model.gen_vision_model.encode(pixels)[1]
        code_embeds = model.embed_image_tokens(codes[:, :-1]).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter(batch.code_input_mask[..., None], code_embeds.to(embeds.dtype))
        return embeds, codes

    def forward(self, batch: JanusBatch) -> LossOutput:
        embeds, codes = self.input_embeddings(batch)
        hidden = self.model.hidden_states(embeds)
        text_mask = batch.text_targets != IGNORE_INDEX
        text_loss = F.cross_entropy(self.model.text_logits(hidden[text_mask]).float(),
                                    batch.text_targets[text_mask], reduction="none")
        image_loss = F.cross_entropy(self.model.image_logits(hidden[batch.code_target_mask]).float(),
                                     codes.reshape(-1), reduction="none")
        token_loss = torch.cat([text_loss, image_loss])
        token_kind = batch.kinds[torch.cat([text_mask.nonzero()[:, 0], batch.code_target_mask.nonzero()[:, 0]])]
        loss_sum = (token_loss * self.kind_weights[token_kind]).sum()
        metrics = {"loss": (token_loss.detach().sum(), token_loss.new_tensor(token_loss.numel()))}
        for index, kind in enumerate(KINDS):
            selected = token_kind == index
            metrics[f"loss_{kind}"] = (token_loss.detach()[selected].sum(), selected.sum().float())
        return LossOutput(loss_sum, metrics)


class JanusTask(Task):
    """Text pretraining and Janus stages I-III: a ratio mixture of understanding, text and generation."""

    def __init__(self, stage, model, tokenizer, context):
        super().__init__(stage, model, tokenizer, context)
        self.objective = JanusObjective(model, stage.loss.kind_weights, stage.loss.fp32_image_codes)
        self.chat_format = chat_format_for(model.config.sft_format)
        self.mixture = Mixture(stage.data.ratios, stage.batch_size, stage.data.seed)
        self.sources = {split: self.make_sources(split) for split in ("train", "validation")}

    def make_sources(self, split: str) -> dict:
        """The example stream of every kind of the mixture (files have no held-out split: they are reused)."""
        data, image_size = self.stage.data, self.model.config.image_size
        sources = {}
        for kind in self.mixture.ratios:
            if kind in data.files:
                sources[kind] = JsonlDataset(data.files[kind], data.seed + (split == "validation"), kind,
                                             data.image_root or None, data.skip_bad)
            elif kind == "understanding":
                sources[kind] = ShapesUnderstanding(data.seed, image_size, data.understanding, split)
            elif kind == "generation":
                sources[kind] = ShapesGeneration(data.seed, image_size, data.generation, split)
            else:
                sources[kind] = ShapesText(data.seed, data.text_style, split)
        return sources

    def on_device(self, device: torch.device, strategy: str) -> None:
        if self.stage.loss.fp32_image_codes:
            # FSDP gathers the frozen VQ in the stage's precision, so float32 encoding would need a copy.
            self.refuse_fsdp(strategy, "loss.fp32_image_codes needs the VQ's float32 weights")

    def on_start(self) -> None:
        """Optionally start gen_embed from the l2-normalised VQ codebook (the reference's advice)."""
        if self.stage.model.gen_embed_init == "codebook":
            with torch.no_grad():
                self.model.gen_embed.weight.copy_(self.model.gen_vision_model.quantize.codebook())

    def encode(self, kind: str, example, index: int):
        """Token sample of one example; generation prompts are dropped to pads with the caption-drop rate."""
        tokenizer, config = self.tokenizer, self.model.config
        if kind == "generation":
            if not isinstance(example, GenerationExample):
                raise ValueError(f"generation data must be image-text pairs, got {type(example).__name__}")
            drop = example_rng(self.stage.data.seed, "caption_drop", index).random() < self.stage.data.caption_drop
            return encode_generation(tokenizer, self.chat_format, example, unconditional=drop)
        if isinstance(example, TextExample) and kind == "text":
            return encode_text(tokenizer, example)
        if isinstance(example, ConversationExample):
            return encode_conversation(tokenizer, self.chat_format, example, config.vision.num_patches)
        raise ValueError(f"{kind} data must be conversations, got {type(example).__name__}")

    def order_slots(self, step: int, slots: list[int]) -> list[int]:
        """Group by kind: sequences of one kind have similar lengths, so micro-batches pad less."""
        kinds = self.mixture.kinds(step)
        return sorted(slots, key=lambda slot: (KINDS.index(kinds[slot]), slot))

    def batch(self, step: int, slots: list[int], split: str = "train") -> JanusBatch:
        assigned = self.mixture.slots(step)
        samples = [self.encode(kind, self.sources[split][kind][index], index)
                   for kind, index in (assigned[slot] for slot in slots)]
        config = self.model.config
        return collate(samples, self.tokenizer.pad_id, self.tokenizer.image_id, config.image_size,
                       config.num_image_tokens)

    def count(self, batch: JanusBatch) -> int:
        return batch.num_targets

    def tokens(self, batch: JanusBatch) -> int:
        return batch.num_tokens

    def activation_bytes(self, micro_batch_size: int, bytes_per_value: int, checkpointing: bool = False) -> int:
        config = self.model.config
        tokens = micro_batch_size * (max(config.vision.num_patches, config.num_image_tokens) + 64)
        llm = transformer_activation_bytes(tokens, config.llm.hidden_size, config.llm.num_layers, bytes_per_value,
                                           checkpointing)
        vision = transformer_activation_bytes(micro_batch_size * config.vision.num_patches, config.vision.width,
                                              config.vision.layers, bytes_per_value, checkpointing)
        logits = micro_batch_size * config.num_image_tokens * config.vq.codebook_size * 4 * 2
        return llm + math.ceil(vision * self.mixture_share("understanding")) + logits

    def mixture_share(self, kind: str) -> float:
        """Fraction of samples of `kind`."""
        return self.mixture.ratios.get(kind, 0.0) / sum(self.mixture.ratios.values())
