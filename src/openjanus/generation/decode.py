"""KV-cached decoding loops: text (streaming, left-padded batches) and image tokens (guided)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..model import JanusModel
from .sampling import GREEDY_BELOW, sample_from, sample_next, sampling_probs

# Speculative Jacobi decoding gains little past a few dozen drafts per pass, and each costs compute.
MAX_JACOBI_WINDOW = 64


def positions_from_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


# A compiled step is specialised to its cache's shape: cache lengths are rounded up to a multiple of this.
STATIC_CACHE_BUCKET = 64


def _prefill(model: JanusModel, inputs_embeds: torch.Tensor, padding_mask: torch.Tensor, new_tokens: int,
             bucket: int = 1):
    batch, length = padding_mask.shape
    cache = model.new_cache(batch, -(-(length + new_tokens) // bucket) * bucket)
    positions = positions_from_mask(padding_mask)
    hidden = model.hidden_states(inputs_embeds, positions, padding_mask, cache)[:, -1]
    return cache, hidden, positions[:, -1:] + 1


@torch.inference_mode()
def stream_text(model: JanusModel, inputs_embeds: torch.Tensor, padding_mask: torch.Tensor,
                max_new_tokens: int, eos_id: int, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                text_step: StaticStep | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) per step; finished rows repeat EOS; stops when all ended.

    `text_step` (from `compile_text_step`) replaces the eager decode steps; same tokens.
    """
    bucket = STATIC_CACHE_BUCKET if text_step is not None else 1
    cache, hidden, next_pos = _prefill(model, inputs_embeds, padding_mask, max_new_tokens, bucket)
    logits = model.text_logits(hidden)
    if text_step is not None:
        cache.mark_static()
    finished = torch.zeros(padding_mask.shape[0], dtype=torch.bool, device=padding_mask.device)
    for step in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = tokens.masked_fill(finished, eos_id)
        yield tokens
        finished |= tokens == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if text_step is None:
            logits = model.text_logits(model.hidden_states(model.embed_text(tokens[:, None]), next_pos, None,
                                                           cache)[:, -1])
        else:
            logits = text_step(model, cache, tokens, next_pos)
            cache.length += 1
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


def _guided_logits(model: JanusModel, hidden: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over image logits; `hidden` holds the conditional rows, then the unconditional."""
    logits = model.image_logits(hidden).float()
    cond, uncond = logits.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def static_text_step(model: JanusModel, cache, slot: torch.Tensor, span: int, previous: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Text logits (B, V) of the next token after `previous` (B,), with static shapes (see `static_image_step`)."""
    hidden = model.backbone.decode_step(model.embed_text(previous[:, None]), positions, slot, cache, span)[:, -1]
    return model.text_logits(hidden)


def static_image_step(model: JanusModel, cache, slot: torch.Tensor, span: int, previous: torch.Tensor,
                      positions: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Guided logits (N, V) of the next image token after `previous` (N,), with static shapes throughout.

    The step that `compile_image_step` compiles: `positions` (2N, 1) and `slot` (1,) are tensors,
    so the graph (and a captured CUDA graph) depends only on the cache's shape and the span of
    it that attention reads, not on how far the image is.
    """
    embeds = model.embed_image_tokens(previous).repeat(2, 1)[:, None]
    hidden = model.backbone.decode_step(embeds, positions, slot, cache, span)[:, -1]
    return _guided_logits(model, hidden, guidance_scale)


class StaticStep:
    """A static decode step (`static_image_step` or `static_text_step`, compiled or not) as the loops call it.

    It passes the cache slot as a tensor and the span of the cache that attention reads: with
    `spans` > 1, the filled slots rounded up to the next of `spans` equal parts of the cache, so
    that early steps read less of it. A compiled step is specialised to each span (one graph each).
    """

    def __init__(self, step: Callable, spans: int = 1):
        self.step, self.spans = step, spans

    def span(self, cache) -> int:
        """Slots the next step reads: the new token's slot included."""
        part = -(-cache.max_length // self.spans)
        return min(cache.max_length, -(-(cache.length + 1) // part) * part)

    def __call__(self, model: JanusModel, cache, *args) -> torch.Tensor:
        slot = torch.full((1,), cache.length, dtype=torch.long, device=cache.key_mask.device)
        return self.step(model, cache, slot, self.span(cache), *args)


# CUDA graphs read the K/V of every slot in their span, so a GPU step is specialised to quarters of the
# cache: about 40% less K/V read per step over a whole image than reading all of it, for 4 graphs.
GPU_SPANS = 4


def _compile_step(step: Callable, device: torch.device | str) -> StaticStep:
    """A static decode step under torch.compile: CUDA graphs on a GPU, frozen packed weights on CPU.

    On CPU, "freezing" makes the weights constants of the graph, which lets inductor pack them for
    oneDNN and concatenate the linear layers that share an input (q/k/v, gate/up): one weight stream
    where eager runs several. The graph then holds its own copy of the weights (so a CPU step has
    one span, one graph), and a model changed after the first call (new weights, an adapter) needs
    a new compiled step.
    """
    if torch.device(device).type != "cuda":
        return StaticStep(torch.compile(step, dynamic=False,
                                        options={"freezing": True, "cpp.enable_concat_linear": True}))
    # One graph per span and cache shape; dynamo's default limit of 8 per function would fall back to eager.
    # (torch before 2.7 calls the limit cache_size_limit.)
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    compiled = torch.compile(step, mode="reduce-overhead", dynamic=False)

    def replay(*args):
        # Each call starts a new graph replay; the previous step's logits have been consumed by then.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return StaticStep(replay, GPU_SPANS)


def compile_image_step(device: torch.device | str) -> StaticStep:
    """`static_image_step` under torch.compile (see `_compile_step`)."""
    return _compile_step(static_image_step, device)


def compile_text_step(device: torch.device | str) -> StaticStep:
    """`static_text_step` under torch.compile (see `_compile_step`)."""
    return _compile_step(static_text_step, device)


@torch.inference_mode()
def generate_image_tokens(model: JanusModel, input_ids: torch.Tensor, padding_mask: torch.Tensor, pad_id: int,
                          guidance_scale: float = 5.0, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None, generator: torch.Generator | None = None,
                          on_step: Callable[[], None] | None = None, num_tokens: int | None = None,
                          jacobi_window: int = 0, stats: dict | None = None,
                          image_step: StaticStep | None = None) -> torch.Tensor:
    """Image-token grid (N, num_image_tokens) for left-padded prompts ending in <begin_of_image>.

    Conditional and unconditional rows run as one batch of 2N rows (halves),
    logits = uncond + w * (cond - uncond). `num_tokens` (default: a whole image) lets benchmarks run part of it.
    `jacobi_window` > 1 turns on speculative Jacobi decoding (see `_jacobi_decode`): fewer forward passes,
    the same output distribution. `stats`, when given, receives "forward_passes" (the prefill included).
    `image_step` (from `compile_image_step`) replaces the plain loop's eager steps (not Jacobi's).
    """
    n = input_ids.shape[0]
    num_tokens = num_tokens or model.config.num_image_tokens
    ids = torch.cat([input_ids, unconditional_ids(input_ids, padding_mask, pad_id)])
    mask = torch.cat([padding_mask, padding_mask])
    bucket = STATIC_CACHE_BUCKET if image_step is not None and jacobi_window <= 1 else 1
    cache, hidden, next_pos = _prefill(model, model.embed_text(ids), mask, num_tokens, bucket)
    codes = torch.empty(n, num_tokens, dtype=torch.long, device=input_ids.device)
    codes[:, 0] = sample_next(_guided_logits(model, hidden, guidance_scale), temperature, top_k, top_p, generator)
    if on_step is not None:
        on_step()
    passes = 1
    if jacobi_window > 1:
        passes += _jacobi_decode(model, cache, next_pos, codes, guidance_scale, temperature, top_k, top_p,
                                 generator, on_step, jacobi_window)
    else:
        if image_step is not None:
            cache.mark_static()
        for i in range(1, num_tokens):
            if image_step is None:
                embeds = model.embed_image_tokens(codes[:, i - 1]).repeat(2, 1)[:, None]
                logits = _guided_logits(model, model.hidden_states(embeds, next_pos, None, cache)[:, -1],
                                        guidance_scale)
            else:
                logits = image_step(model, cache, codes[:, i - 1], next_pos, guidance_scale)
                cache.length += 1
            next_pos = next_pos + 1
            codes[:, i] = sample_next(logits, temperature, top_k, top_p, generator)
            passes += 1
            if on_step is not None:
                on_step()
    if stats is not None:
        stats["forward_passes"] = passes
    return codes


def _jacobi_decode(model: JanusModel, cache, next_pos: torch.Tensor, codes: torch.Tensor, guidance_scale: float,
                   temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                   on_step: Callable[[], None] | None, window: int) -> int:
    """Fill `codes[:, 1:]` by speculative Jacobi decoding; returns the number of forward passes.

    Speculative Jacobi decoding (Teng et al., 2024, arXiv:2410.01699): every pass feeds the last
    accepted token plus up to `window - 1` draft tokens and so gets the next `window` distributions
    at once. Drafts are checked in order as in speculative sampling: draft x, drawn from q, is kept
    with probability min(1, p(x) / q(x)); the first one refused is redrawn from max(0, p - q) and
    the rest are refreshed from this pass's (Jacobi) distributions, with those as their new q.
    Fresh drafts start uniform. Every kept token is thus an exact sample of p, whatever the drafts
    were (greedy: a draft is kept when it is the argmax). All images of the batch advance by the
    fewest tokens any of them kept, which keeps one shared cache and stays exact.
    """
    n, num_tokens = codes.shape
    greedy = temperature < GREEDY_BELOW
    device, vocab = codes.device, model.config.vq.codebook_size
    drafts = torch.empty(n, 0, dtype=torch.long, device=device)
    draft_probs = None  # (n, drafts, V): the distribution each draft was drawn from
    accepted, passes = 1, 0
    while accepted < num_tokens:
        width = min(window, num_tokens - accepted)  # distributions this pass yields: positions accepted..+width-1
        missing = width - 1 - drafts.shape[1]
        if missing > 0:
            fresh = torch.randint(vocab, (n, missing), generator=generator, device=device)
            drafts = torch.cat([drafts, fresh], dim=1)
            if not greedy:
                uniform = torch.full((n, missing, vocab), 1.0 / vocab, device=device)
                draft_probs = uniform if draft_probs is None else torch.cat([draft_probs, uniform], dim=1)
        drafts = drafts[:, :width - 1]
        if not greedy:
            draft_probs = draft_probs[:, :width - 1]
        inputs = torch.cat([codes[:, accepted - 1:accepted], drafts], dim=1)
        positions = next_pos + torch.arange(width, device=device)
        hidden = model.hidden_states(model.embed_image_tokens(inputs).repeat(2, 1, 1), positions, None, cache)
        logits = _guided_logits(model, hidden, guidance_scale)  # (n, width, V)
        passes += 1
        if greedy:
            targets = logits.argmax(dim=-1)
            keep = drafts == targets[:, :-1]
        else:
            probs = sampling_probs(logits, temperature, top_k, top_p)
            p_draft = probs[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
            q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
            keep = torch.rand(p_draft.shape, generator=generator, device=device) * q_draft < p_draft
        kept = int(keep.long().cumprod(dim=1).sum(dim=1).min())  # drafts every image keeps
        codes[:, accepted:accepted + kept] = drafts[:, :kept]
        # The token after them: the draft where an image kept it too, else the redrawn (or next) token.
        if greedy:
            token = targets[:, kept]
        elif kept == width - 1:
            token = sample_from(probs[:, kept], generator)
        else:
            residual = (probs[:, kept] - draft_probs[:, kept]).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs[:, kept])
            token = torch.where(keep[:, kept], drafts[:, kept], sample_from(residual, generator))
        codes[:, accepted + kept] = token
        # Only the last accepted token and the kept drafts wrote valid keys and values.
        cache.length -= width - 1 - kept
        next_pos = next_pos + kept + 1
        accepted += kept + 1
        if on_step is not None:
            for _ in range(kept + 1):
                on_step()
        # Jacobi update: the positions past the new token get this pass's distributions as drafts.
        later = logits[:, kept + 1:] if greedy else probs[:, kept + 1:]
        drafts = later.argmax(dim=-1) if greedy else sample_from(later, generator)
        draft_probs = None if greedy else later
    return passes
