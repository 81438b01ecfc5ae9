"""The generation tokenizer: LlamaGen's VQGAN ("VQ-16") with an l2-normalised codebook."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQConfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head attention over all spatial positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official code casts to bfloat16 here unconditionally, which breaks fp16; keep the input dtype.
        x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        return self.conv(x)


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention, optional resampling."""

    def __init__(self, channels_in: int, channels_out: int, num_blocks: int, attention: bool,
                 resample: type[nn.Module] | None, dropout: float):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.res.append(ResnetBlock(channels_in, channels_out, dropout))
            channels_in = channels_out
            if attention:
                self.attn.append(AttnBlock(channels_out))
        if resample is Downsample:
            self.downsample = Downsample(channels_out)
        elif resample is Upsample:
            self.upsample = Upsample(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _mid(channels: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


class Encoder(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult = config.ch, config.encoder_ch_mult
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = [1, *mult]
        last = len(mult) - 1
        self.conv_blocks = nn.ModuleList(
            _Level(ch * in_mult[i], ch * mult[i], config.num_res_blocks, attention=i == last,
                   resample=None if i == last else Downsample, dropout=config.dropout_p)
            for i in range(len(mult))
        )
        top = ch * mult[-1]
        self.mid = _mid(top, config.dropout_p)
        self.norm_out = _norm(top)
        self.conv_out = nn.Conv2d(top, config.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult = config.ch, config.decoder_ch_mult
        channels = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, 1, 1)
        self.mid = _mid(channels, config.dropout_p)
        levels = []
        for i in range(len(mult)):  # deepest first
            out = ch * mult[len(mult) - 1 - i]
            levels.append(_Level(channels, out, config.num_res_blocks + 1, attention=i == 0,
                                 resample=Upsample if i != len(mult) - 1 else None, dropout=config.dropout_p))
            channels = out
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook lookup (optionally on l2-normalised vectors) with VQ losses for training."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        self.l2_norm = config.codebook_l2_norm
        if config.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def forward(self, z: torch.Tensor, beta: float = 0.25):
        """Quantise z (B, C, H, W): straight-through z_q, indices (B, H*W), codebook and commitment losses."""
        b, c, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, c)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        codebook = self.codebook()
        distances = (z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
                     - 2 * z @ codebook.t())
        indices = distances.argmin(dim=1)
        z_q = codebook[indices]
        codebook_loss = F.mse_loss(z_q, z.detach())
        commit_loss = beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        z_q = z_q.view(b, h, w, c).permute(0, 3, 1, 2)
        return z_q, indices.view(b, h * w), codebook_loss, commit_loss

    def lookup(self, indices: torch.Tensor, grid: int) -> torch.Tensor:
        """Code vectors (B, C, grid, grid) for indices (B, grid*grid)."""
        z = self.codebook()[indices]
        return z.view(indices.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantizer; post_quant_conv -> decoder."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents (B, codebook_embed_dim, h, w) of images in [-1, 1]."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor):
        """Quantise images in [-1, 1]: (z_q, indices (B, h*w), codebook_loss, commit_loss)."""
        return self.quantize(self.latents(images))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Pixels in about [-1, 1] from quantised latents."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """Pixels from a square grid of code indices (B, grid*grid)."""
        grid = int(round(indices.shape[1] ** 0.5))
        if grid * grid != indices.shape[1]:
            raise ValueError(f"{indices.shape[1]} image tokens do not form a square grid")
        return self.decode(self.quantize.lookup(indices, grid))

    def forward(self, images: torch.Tensor):
        """Reconstruction and VQ losses, for tokenizer training."""
        z_q, indices, codebook_loss, commit_loss = self.encode(images)
        return self.decode(z_q), indices, codebook_loss, commit_loss
