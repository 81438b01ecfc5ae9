"""Decoding loops and sampling; both tasks share one KV cache implementation."""

from .decode import generate_image_tokens, positions_from_mask, stream_text, unconditional_ids
from .sampling import check_sampling, make_generator, sample_next

__all__ = ["check_sampling", "generate_image_tokens", "make_generator", "positions_from_mask", "sample_next",
           "stream_text", "unconditional_ids"]
