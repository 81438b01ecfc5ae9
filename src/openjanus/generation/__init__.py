"""Decoding loops and sampling; both tasks share one KV cache implementation."""

from .decode import (
    MAX_JACOBI_WINDOW,
    compile_image_step,
    compile_text_step,
    generate_image_tokens,
    positions_from_mask,
    stream_text,
    unconditional_ids,
)
from .sampling import check_sampling, make_generator, sample_next

__all__ = ["MAX_JACOBI_WINDOW", "check_sampling", "compile_image_step", "compile_text_step", "generate_image_tokens",
           "make_generator", "positions_from_mask", "sample_next", "stream_text", "unconditional_ids"]
