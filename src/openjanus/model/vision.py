"""Understanding encoder (SigLIP ViT, timm layout) and the MLP adaptors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .kernels import attention


class VitMlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VitAttention(nn.Module):
    """Bidirectional attention with a fused qkv projection (q, k, v stacked in that order)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VitBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        w = config.width
        self.norm1 = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.attn = VitAttention(w, config.heads)
        self.norm2 = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.mlp = VitMlp(w, int(w * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, config.patch_size, config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AttentionPoolLatent(nn.Module):
    """timm's attention-pool head: stored in official checkpoints, never run by Janus."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        w = config.width
        self.latent = nn.Parameter(torch.zeros(1, 1, w))
        self.q = nn.Linear(w, w)
        self.kv = nn.Linear(w, 2 * w)
        self.proj = nn.Linear(w, w)
        self.norm = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.mlp = VitMlp(w, int(w * config.mlp_ratio))


class VisionTransformer(nn.Module):
    """SigLIP ViT without class token; returns the final-LayerNorm'd patch features."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.width))
        self.blocks = nn.ModuleList(VitBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        if config.global_pool == "map":
            self.attn_pool = AttentionPoolLatent(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisionTower(nn.Module):
    """The official `CLIPVisionTower` wrapper (keys under `vision_tower.`)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vision_tower = VisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values)


class MlpProjector(nn.Module):
    """Linear -> exact GELU -> Linear, stored as `layers.0` and `layers.2`."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
