"""The understanding-encoder trainer: SigLIP's pairwise sigmoid loss against a small text tower.

The image side is Janus's own `vision_model` (mean-pooled patch features and a projection);
the text tower and both projections exist only for this stage and are not exported. For a
batch of B pairs, logits z_ij = exp(t') <x_i, y_j> + b with t' initialised at log(10) and
b at -10, and the loss is -(1/B) sum_i sum_j log sigmoid(label_ij z_ij), label +1 on matches.
Across processes each one scores its own images against every process's texts (an
autograd-aware all-gather), so the contrastive batch is the whole micro-step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data.shapes import ShapesCaptions
from ..processing.image import preprocess_image
from .config import TextTowerConfig
from .tasks import LossOutput, Task, transformer_activation_bytes


@dataclass
class PairBatch:
    """Images (N, 3, S, S), caption ids (N, L) right-padded and their mask of real tokens."""

    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor

    def to(self, device) -> PairBatch:
        """The batch on `device`."""
        return PairBatch(self.images.to(device), self.text_ids.to(device), self.text_mask.to(device))


class TextTower(nn.Module):
    """Pre-norm transformer encoder over caption tokens, mean-pooled over real tokens and projected."""

    def __init__(self, config: TextTowerConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.width)
        self.position = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.projection = nn.Linear(config.width, config.embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.projection(pooled)


class SigLipObjective(nn.Module):
    """Pairwise sigmoid loss between the understanding encoder and the text tower."""

    def __init__(self, model, text_tower: TextTower, embed_dim: int, temperature_init: float, bias_init: float,
                 distributed: bool):
        super().__init__()
        self.model, self.text_tower = model, text_tower
        self.image_projection = nn.Linear(model.config.vision.width, embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature_init)))
        self.bias = nn.Parameter(torch.tensor(bias_init))
        self.distributed = distributed

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (N, E) from mean-pooled patch features."""
        return F.normalize(self.image_projection(self.model.vision_model(images).mean(1)).float(), dim=-1)

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings (N, E)."""
        return F.normalize(self.text_tower(ids, mask).float(), dim=-1)

    def forward(self, batch: PairBatch) -> LossOutput:
        images = self.embed_images(batch.images)
        texts = self.embed_texts(batch.text_ids, batch.text_mask)
        offset = 0
        if self.distributed:
            # The functional all-gather is differentiable: each process's texts get every process's gradient.
            from torch.distributed._functional_collectives import all_gather_single

            offset = dist.get_rank() * texts.shape[0]
            texts = all_gather_single(texts, 0, dist.group.WORLD)
        logits = images @ texts.t() * self.log_temperature.exp() + self.bias
        matches = torch.arange(images.shape[0], device=logits.device) + offset
        labels = -torch.ones_like(logits)
        labels[torch.arange(images.shape[0]), matches] = 1.0
        loss_sum = -F.logsigmoid(labels * logits).sum()
        count = logits.new_tensor(float(images.shape[0]))
        correct = (logits.detach().argmax(dim=1) == matches).float().sum()
        return LossOutput(loss_sum, {"loss": (loss_sum.detach(), count), "accuracy": (correct, count),
                                     "temperature": (self.log_temperature.detach().exp() * count, count),
                                     "bias": (self.bias.detach() * count, count)})


class EncoderTask(Task):
    """Train `vision_model` contrastively on ShapesWorld (image, dense caption) pairs."""

    throughput_unit = "pairs"

    def __init__(self, stage, model, tokenizer, context):
        super().__init__(stage, model, tokenizer, context)
        tower = stage.model.text_tower
        self.objective = SigLipObjective(model, TextTower(tower, model.config.llm.vocab_size), tower.embed_dim,
                                         stage.loss.temperature_init, stage.loss.bias_init, context.enabled)
        self.pairs = {split: ShapesCaptions(stage.data.seed, model.config.image_size, split)
                      for split in ("train", "validation")}

    def collate(self, pairs: list) -> PairBatch:
        """Preprocessed images and right-padded caption ids (truncated to the tower's length)."""
        size, max_length = self.model.config.image_size, self.stage.model.text_tower.max_length
        rows = [self.tokenizer.encode(caption)[:max_length] for _, caption in pairs]
        ids = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for row, tokens in enumerate(rows):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = True
        return PairBatch(torch.stack([preprocess_image(image, size) for image, _ in pairs]), ids, mask)

    def batch(self, step: int, slots: list[int], split: str = "train") -> PairBatch:
        start = step * self.stage.batch_size
        return self.collate([self.pairs[split][start + slot] for slot in slots])

    def count(self, batch: PairBatch) -> int:
        return batch.images.shape[0]

    def activation_bytes(self, micro_batch_size: int, bytes_per_value: int, checkpointing: bool = False) -> int:
        vision, tower = self.model.config.vision, self.stage.model.text_tower  # the text tower is not checkpointed
        return (transformer_activation_bytes(micro_batch_size * vision.num_patches, vision.width, vision.layers,
                                             bytes_per_value, checkpointing)
                + transformer_activation_bytes(micro_batch_size * tower.max_length, tower.width, tower.layers,
                                               bytes_per_value))
