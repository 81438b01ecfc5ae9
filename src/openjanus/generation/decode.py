"""KV-cached decoding loops: text (streaming, left-padded batches) and image tokens (guided)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..model import JanusModel
from .sampling import sample_next


def positions_from_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


def _prefill(model: JanusModel, inputs_embeds: torch.Tensor, padding_mask: torch.Tensor, new_tokens: int):
    batch, length = padding_mask.shape
    cache = model.new_cache(batch, length + new_tokens)
    positions = positions_from_mask(padding_mask)
    hidden = model.hidden_states(inputs_embeds, positions, padding_mask, cache)[:, -1]
    return cache, hidden, positions[:, -1:] + 1


@torch.inference_mode()
def stream_text(model: JanusModel, inputs_embeds: torch.Tensor, padding_mask: torch.Tensor,
                max_new_tokens: int, eos_id: int, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) per step; finished rows repeat EOS; stops when all ended."""
    cache, hidden, next_pos = _prefill(model, inputs_embeds, padding_mask, max_new_tokens)
    finished = torch.zeros(padding_mask.shape[0], dtype=torch.bool, device=padding_mask.device)
    for step in range(max_new_tokens):
        tokens = sample_next(model.text_logits(hidden), temperature, top_k, top_p, generator)
        tokens = tokens.masked_fill(finished, eos_id)
        yield tokens
        finished |= tokens == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        hidden = model.hidden_states(model.embed_text(tokens[:, None]), next_pos, None, cache)[:, -1]
        next_pos = next_pos + 1


def unconditional_ids(input_ids: torch.Tensor, padding_mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The guidance row: every real token but the first (BOS) and the last (<begin_of_image>) padded."""
    uncond = input_ids.clone()
    first = padding_mask.long().argmax(dim=-1)
    keep = torch.zeros_like(padding_mask)
    keep[torch.arange(len(first)), first] = True
    keep[:, -1] = True
    uncond[padding_mask & ~keep] = pad_id
    return uncond


@torch.inference_mode()
def generate_image_tokens(model: JanusModel, input_ids: torch.Tensor, padding_mask: torch.Tensor, pad_id: int,
                          guidance_scale: float = 5.0, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None, generator: torch.Generator | None = None,
                          on_step: Callable[[], None] | None = None, num_tokens: int | None = None) -> torch.Tensor:
    """Image-token grid (N, num_image_tokens) for left-padded prompts ending in <begin_of_image>.

    Conditional and unconditional rows run as one batch of 2N rows (halves),
    logits = uncond + w * (cond - uncond). `num_tokens` (default: a whole image) lets benchmarks run part of it.
    """
    n = input_ids.shape[0]
    num_tokens = num_tokens or model.config.num_image_tokens
    ids = torch.cat([input_ids, unconditional_ids(input_ids, padding_mask, pad_id)])
    mask = torch.cat([padding_mask, padding_mask])
    cache, hidden, next_pos = _prefill(model, model.embed_text(ids), mask, num_tokens)
    codes = torch.empty(n, num_tokens, dtype=torch.long, device=input_ids.device)
    for i in range(num_tokens):
        logits = model.image_logits(hidden).float()
        cond, uncond = logits[:n], logits[n:]
        codes[:, i] = sample_next(uncond + guidance_scale * (cond - uncond), temperature, top_k, top_p, generator)
        if on_step is not None:
            on_step()
        if i == num_tokens - 1:
            break  # the last token's embedding would never be used
        embeds = model.embed_image_tokens(codes[:, i]).repeat(2, 1)[:, None]
        hidden = model.hidden_states(embeds, next_pos, None, cache)[:, -1]
        next_pos = next_pos + 1
    return codes
