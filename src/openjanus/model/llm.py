"""LLaMA decoder with a static, preallocated KV cache.

Module and parameter names follow Hugging Face `LlamaForCausalLM`, which is what
the official Janus checkpoints store under `language_model.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from .kernels import attention


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as LLaMA does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Preallocated keys/values for every layer plus which slots hold real tokens.

    Slots are shared by all rows of the batch; `key_mask` marks left padding so
    that rows of different lengths can decode together. The same cache serves
    text and image decoding and can be reset and reused.
    """

    def __init__(self, config: LLMConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]

    def reset(self) -> None:
        """Forget all tokens (the buffers are kept for reuse)."""
        self.key_mask.zero_()
        self.length = 0

    def mark_static(self) -> None:
        """Tell torch.compile the buffers never move, so CUDA graphs use them in place instead of copying."""
        for tensor in (*self.keys, *self.values, self.key_mask):
            torch._dynamo.mark_static_address(tensor)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape (B, 1, T, head_dim) for the rotate-half RoPE convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query/key heads by their positions."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads through scaled_dot_product_attention."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0,
                start: int | torch.Tensor = 0):
        """`start` is the cache slot of the first token; as a tensor (the static decode step) the
        keys and values are written there and attention reads the cache's first `mask.shape[-1]`
        slots, which `mask` limits."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start, torch.Tensor):
            cache.keys[layer].index_copy_(2, start, k)
            cache.values[layer].index_copy_(2, start, v)
            span = mask.shape[-1]
            k, v = cache.keys[layer][:, :, :span], cache.values[layer][:, :, :span]
        elif cache is not None:
            cache.keys[layer][:, :, start:start + t] = k
            cache.values[layer][:, :, start:start + t] = v
            k = cache.keys[layer][:, :, :start + t]
            v = cache.values[layer][:, :, :start + t]
        gqa = self.num_heads != self.num_kv_heads
        if mask is None:
            out = attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(key_mask: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Boolean (B, 1, T, start+T) mask: causal, padding keys hidden.

    Every query may always see itself, so rows made only of padding never
    produce NaNs that could leak through the cache.
    """
    total = start + length
    query_pos = torch.arange(start, total, device=key_mask.device)[:, None]
    key_pos = torch.arange(total, device=key_mask.device)[None, :]
    causal = key_pos <= query_pos
    allowed = causal[None] & key_mask[:, None, :total]
    allowed |= (key_pos == query_pos)[None]
    return allowed[:, None]


class LlamaBackbone(nn.Module):
    """Embeddings, decoder layers and the final norm (HF `LlamaModel`)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Normed hidden states for `inputs_embeds` (B, T, D).

        With a cache, the tokens are appended at `cache.length`; `padding_mask`
        (B, T) marks real tokens (False = left padding).
        """
        b, t, _ = inputs_embeds.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=inputs_embeds.device).expand(b, t)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        if cache is not None:
            if start + t > cache.max_length:
                raise ValueError(f"KV cache holds {cache.max_length} tokens, {start + t} requested")
            cache.key_mask[:, start:start + t] = True if padding_mask is None else padding_mask
            mask = attention_mask(cache.key_mask, start, t)
        elif padding_mask is not None:
            mask = attention_mask(padding_mask, 0, t)
        else:
            mask = None  # plain causal
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
        if cache is not None:
            cache.length = start + t
        return self.norm(x)

    def decode_step(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, slot: torch.Tensor,
                    cache: KVCache, span: int) -> torch.Tensor:
        """Normed hidden states (B, 1, D) of one new token per row, stored at cache slot `slot` (shape (1,)).

        Every shape is fixed by the cache and `span` (how many of its first slots attention reads, at
        least slot + 1), not by how full the cache is, so one compiled graph (and one CUDA graph)
        serves every step of a span. Attention reads the unfilled slots of the span masked, so this
        costs more than `forward` when run eagerly; `cache.length` is the caller's.
        """
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        cache.key_mask.index_fill_(1, slot, True)
        key_pos = torch.arange(span, device=slot.device)
        mask = (cache.key_mask[:, :span] & (key_pos <= slot))[:, None, None, :]
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, slot)
        return self.norm(x)


class LanguageModel(nn.Module):
    """`LlamaForCausalLM`: backbone plus an (untied by default) LM head."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
