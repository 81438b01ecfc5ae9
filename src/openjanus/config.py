"""Plain dataclass configs for Janus models and the named presets.

A `JanusConfig` fully describes the architecture; nothing is taken from code
tables at load time, so small custom models and the official sizes go through
the same code. Presets hold the exact numbers of the official checkpoints
(see `shared/reference/janus.md` section 1.7).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a model: unknown key, wrong type or bad value."""


@dataclass
class LLMConfig:
    """LLaMA-style decoder."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 16384
    # The official models were trained at 4096 tokens although the config says 16384.
    context_length: int = 4096
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class VisionConfig:
    """SigLIP-style ViT (timm layout) used for understanding."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    # "map" builds the attention-pool head that official checkpoints store but never run,
    # so that they round-trip exactly; "" (none) drops it.
    global_pool: str = "map"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VQConfig:
    """LlamaGen VQGAN ("VQ-16") used for generation."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    # Keeps the official checkpoints' `codebook_used` bookkeeping buffer (65536 floats).
    codebook_show_usage: bool = True
    ch: int = 128
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    num_res_blocks: int = 2
    dropout_p: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


@dataclass
class JanusConfig:
    """The whole model: LLM, understanding encoder, VQ tokenizer, adaptors and heads."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    # Hidden width of the image head (`image_token_embed` in the official config); 0 = LLM width.
    gen_head_dim: int = 0
    # Chat roles: "deepseek" = <|User|>/<|Assistant|> (Janus-Pro), "deepseek_old" = User/Assistant.
    sft_format: str = "deepseek"

    @property
    def image_size(self) -> int:
        """Side of generated and understood images in pixels."""
        return self.vision.image_size

    @property
    def gen_grid(self) -> int:
        """Side of the generated image-token grid."""
        return self.vision.image_size // self.vq.downsample_factor

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per generated image."""
        return self.gen_grid**2

    @property
    def head_dim(self) -> int:
        return self.gen_head_dim or self.llm.hidden_size

    def validate(self) -> JanusConfig:
        """Check cross-field constraints; returns self."""
        llm, vis, vq = self.llm, self.vision, self.vq
        checks = [
            (llm.hidden_size % llm.num_heads == 0, "llm.hidden_size must be divisible by llm.num_heads"),
            (llm.num_heads % llm.num_kv_heads == 0, "llm.num_heads must be divisible by llm.num_kv_heads"),
            (llm.head_dim % 2 == 0, "llm head dim must be even for RoPE"),
            (vis.image_size % vis.patch_size == 0, "vision.image_size must be divisible by vision.patch_size"),
            (vis.width % vis.heads == 0, "vision.width must be divisible by vision.heads"),
            (vis.image_size % vq.downsample_factor == 0,
             "vision.image_size must be divisible by the VQ downsample factor"),
            (len(vq.encoder_ch_mult) == len(vq.decoder_ch_mult), "vq encoder and decoder need as many levels"),
            (all(vq.ch * m % 32 == 0 for m in vq.encoder_ch_mult + vq.decoder_ch_mult) and vq.z_channels >= 1,
             "vq channels must be multiples of 32 (GroupNorm with 32 groups)"),
            (self.sft_format in ("deepseek", "deepseek_old"), "sft_format must be 'deepseek' or 'deepseek_old'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JanusConfig:
        """Build from a dict, rejecting unknown keys and wrong types with the key named."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        sub = {"llm": LLMConfig, "vision": VisionConfig, "vq": VQConfig}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sub:
                kwargs[key] = _build(sub[key], value, key)
            else:
                kwargs[key] = value
        return _build(cls, kwargs, "", nested=sub).validate()


def _build(cls, values: Any, prefix: str, nested: dict | None = None):
    """Instantiate a config dataclass with key and type checks."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}'")
        if nested and key in nested:
            continue
        default = getattr(cls(), key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, list):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"config key '{name}' must be {type(default).__name__}, got {value!r}")
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    return cls(**values)


def _official(hidden: int, intermediate: int, layers: int, heads: int, sft_format: str) -> JanusConfig:
    llm = LLMConfig(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                    num_heads=heads, num_kv_heads=heads)
    return JanusConfig(llm=llm, sft_format=sft_format)


PRESETS = {
    "janus-1.3b": lambda: _official(2048, 5632, 24, 16, "deepseek_old"),
    "janus-pro-1b": lambda: _official(2048, 5632, 24, 16, "deepseek"),
    "janus-pro-7b": lambda: _official(4096, 11008, 30, 32, "deepseek"),
}


def get_preset(name: str) -> JanusConfig:
    """A fresh config for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]().validate()
