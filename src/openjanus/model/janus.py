"""The Janus composition: one LLM, two decoupled visual pathways.

Attribute names are the official `MultiModalityCausalLM` ones, so an official
state dict loads key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import JanusConfig
from .llm import KVCache, LanguageModel
from .vision import MlpProjector, VisionTower
from .vq import VQModel


class GenHead(nn.Module):
    """Image-token head: Linear -> exact GELU -> Linear to codebook logits."""

    def __init__(self, hidden: int, head_dim: int, codebook_size: int):
        super().__init__()
        self.output_mlp_projector = nn.Linear(hidden, head_dim)
        self.vision_head = nn.Linear(head_dim, codebook_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(F.gelu(self.output_mlp_projector(x)))


class JanusModel(nn.Module):
    """Understanding: SigLIP -> aligner -> LLM -> lm_head. Generation: codes -> gen_embed ->
    gen_aligner -> LLM -> gen_head, codes -> VQ decoder -> pixels."""

    def __init__(self, config: JanusConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.llm.hidden_size
        self.vision_model = VisionTower(config.vision)
        self.aligner = MlpProjector(config.vision.width, d)
        self.gen_vision_model = VQModel(config.vq)
        self.gen_aligner = MlpProjector(config.vq.codebook_embed_dim, d)
        self.gen_head = GenHead(d, config.head_dim, config.vq.codebook_size)
        self.gen_embed = nn.Embedding(config.vq.codebook_size, config.vq.codebook_embed_dim)
        self.language_model = LanguageModel(config.llm)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> JanusModel:
        """Load a checkpoint directory in any supported layout (official, transformers, openjanus)."""
        from ..weights import load_checkpoint  # model/ itself stays free of I/O

        return load_checkpoint(path, device=device, dtype=dtype).model

    @property
    def backbone(self):
        return self.language_model.model

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed_tokens(input_ids.clamp(min=0))

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Understanding embeddings (N, patches, D) for preprocessed images (N, 3, S, S)."""
        return self.aligner(self.vision_model(pixel_values))

    def embed_image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings for generated image-token ids."""
        return self.gen_aligner(self.gen_embed(codes))

    def prepare_inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with image features scattered, in order, into `image_mask` positions."""
        embeds = self.embed_text(input_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            features = self.embed_images(pixel_values.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
            features = features.to(embeds.dtype)  # autocast may compute the vision tower in another dtype
            if int(image_mask.sum()) != features.shape[0]:
                raise ValueError(f"{int(image_mask.sum())} image positions for {features.shape[0]} image features")
            embeds = embeds.masked_scatter(image_mask[..., None], features)
        return embeds

    def hidden_states(self, inputs_embeds, position_ids=None, padding_mask=None, cache: KVCache | None = None):
        """Final-norm hidden states of the LLM."""
        return self.backbone(inputs_embeds, position_ids, padding_mask, cache)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gen_head(hidden)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A preallocated KV cache on this model's device and dtype."""
        weight = self.backbone.embed_tokens.weight
        return KVCache(self.config.llm, batch_size, max_length, weight.dtype, weight.device)

    def decode_image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S) in about [-1, 1] from image tokens (B, grid*grid)."""
        return self.gen_vision_model.decode_code(codes)
