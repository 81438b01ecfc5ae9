"""Next-token sampling shared by text and image decoding."""

from __future__ import annotations

import torch

# Temperatures this small would overflow logits / temperature into inf and NaN; they mean greedy anyway.
GREEDY_BELOW = 1e-5


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Reject out-of-range sampling settings with a clear message."""
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution that sampling draws from, over the last dimension of `logits` (any leading shape).

    Temperature must not be greedy (callers take the argmax themselves).
    """
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per distribution in `probs` (..., V), shaped like its leading dimensions."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V); temperature 0 means greedy argmax."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    return sample_from(sampling_probs(logits, temperature, top_k, top_p), generator)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A seeded generator on `device`, or None for the global RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator
