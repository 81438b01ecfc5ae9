"""What every trainer provides to the shared training loop, and the helpers they share.

A task owns an `objective` (an nn.Module whose forward turns a batch into a summed loss, so
that DDP and FSDP wrap it as is), makes the batches of any global step from the step number
alone, and says how many supervised units a batch holds (the loop divides by the global
total, which makes any split over processes and micro-batches give the same gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..model import JanusModel
from ..model.llm import DecoderLayer
from ..model.vision import VitBlock
from ..processing.tokenizer import JanusTokenizer
from .config import StageConfig
from .distributed import DistributedContext
from .lora import add_lora, merge_lora


@dataclass
class LossOutput:
    """A micro-batch's loss summed over its supervised units, and metrics as (sum, count) pairs."""

    loss_sum: torch.Tensor
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    outputs: Any = None  # what `Task.after_step` needs from the forward pass, if anything


class Task:
    """Base class of the trainers: subclasses set `objective` and implement `batch` and `count`."""

    objective: nn.Module
    throughput_unit = "tokens"  # what `tokens` counts, for the progress bar and metrics.jsonl

    def __init__(self, stage: StageConfig, model: JanusModel, tokenizer: JanusTokenizer | None,
                 context: DistributedContext):
        self.stage, self.model, self.tokenizer, self.context = stage, model, tokenizer, context
        lora = stage.model.lora
        freeze_except(model, [c for c in stage.model.train if lora is None or c != "language_model"])
        if lora is not None:
            add_lora(model.language_model, lora)

    def plain_model(self, state: dict[str, torch.Tensor]) -> JanusModel:
        """A plain JanusModel with the weights `state` (this task's model layout), LoRA adapters merged in."""
        model = JanusModel(self.model.config)
        if self.stage.model.lora is not None:
            add_lora(model.language_model, self.stage.model.lora)
        model.load_state_dict(state)
        if self.stage.model.lora is not None:
            merge_lora(model.language_model)
        return model

    def order_slots(self, step: int, slots: list[int]) -> list[int]:
        """This process's slots of step `step` in the order they are cut into micro-batches."""
        return slots

    def batch(self, step: int, slots: list[int], split: str = "train"):
        """The examples at `slots` (positions in the global batch) of global step `step`, collated.

        The "validation" split gives the held-out batches the loop evaluates at the end of a stage.
        """
        raise NotImplementedError

    def count(self, batch) -> int:
        """Supervised units (tokens, images or pairs) in a batch: the loss is normalised by their global sum."""
        raise NotImplementedError

    def tokens(self, batch) -> int:
        """Units processed (positions, images or pairs), for the throughput readout."""
        return self.count(batch)

    def shard_units(self) -> list[nn.Module]:
        """Submodules FSDP shards on their own: transformer blocks."""
        return [m for m in self.objective.modules() if isinstance(m, (DecoderLayer, VitBlock))]

    def on_start(self) -> None:
        """Set-up done once when the stage starts from step 0 (not on resume)."""

    def on_device(self, device: torch.device, strategy: str) -> None:
        """Move and wrap what the task keeps outside the objective (called once the objective is placed)."""

    def refuse_fsdp(self, strategy: str, needs: str) -> None:
        """A clear error for a setting that multi-process FSDP cannot honour (`needs` says why)."""
        if strategy == "fsdp" and self.context.enabled:
            raise ConfigError(f"stage {self.stage.name}: {needs}: use ddp, not fsdp")

    def after_step(self, step: int, outputs: list[Any]) -> dict[str, float]:
        """Work after the optimizer step (e.g. a discriminator update); returns extra metrics."""
        return {}

    def evaluate(self, model: JanusModel) -> dict[str, float]:
        """End-of-stage metrics of the exported (unsharded) model, computed on the main process."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Training state the task keeps outside the objective and its optimizer."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`."""

    def activation_bytes(self, micro_batch_size: int, bytes_per_value: int, checkpointing: bool = False) -> int:
        """Rough activation memory of one micro-batch, for --dry-run (`checkpointing`: activation checkpointing
        of the transformer blocks)."""
        return 0


def freeze_except(model: JanusModel, components: list[str]) -> None:
    """Only the named components of `model` require gradients."""
    model.requires_grad_(False)
    for name in components:
        getattr(model, name).requires_grad_(True)


def initialize_weights(model: JanusModel, std: float = 0.02) -> None:
    """From-scratch initialisation: small normal weights for linear, embedding and position tables.

    PyTorch's default N(0, 1) embeddings and the zero ViT position table suit neither a
    LLaMA decoder nor a ViT trained from nothing; convolutions keep their defaults.
    """
    codebook = model.gen_vision_model.quantize.embedding
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module is not codebook:
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        model.vision_model.vision_tower.pos_embed.normal_(0.0, std)
        # Residual output projections scaled down with depth (GPT-2), so deep stacks start near identity.
        scale = std / math.sqrt(2 * max(model.config.llm.num_layers, 1))
        for layer in model.backbone.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, scale)
            layer.mlp.down_proj.weight.normal_(0.0, scale)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable


def transformer_activation_bytes(tokens: int, width: int, layers: int, bytes_per_value: int,
                                 checkpointing: bool = False) -> int:
    """About 17 saved values per token, channel and layer in a pre-norm block with fused attention.

    With activation checkpointing every block keeps only its input (one value), and the block
    being recomputed in the backward pass holds its 17 again.
    """
    values = layers + 16 if checkpointing and layers else 17 * layers
    return tokens * width * values * bytes_per_value
