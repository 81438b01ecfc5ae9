"""Pieces every evaluation shares: argument checks, batched seeded generation, VQ round trips, JSON reports.

The evaluations only need a pipeline-like object with ``config.image_size``, ``device``,
``generate_image_tokens``, ``decode_images``, ``answer`` and ``model.gen_vision_model.encode``
(what `JanusPipeline` provides), so tests can drive them with fakes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..processing.image import preprocess_images
from ..worlds import shapes


def weight_format(pipe: Any) -> str:
    """How the evaluated weights are stored, for reports: the LLM's dtype, and "int8" when quantized."""
    from ..model.quant import Int8Linear

    model = pipe.model
    if not isinstance(model, torch.nn.Module):  # a test's stand-in
        return "unknown"
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else dtype


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is a non-negative integer, else raise ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def shapes_image_size(pipe: Any) -> int:
    """The model's image size, or a clear ValueError when ShapesWorld cannot be drawn at that size."""
    size = pipe.config.image_size
    try:
        return shapes.check_size(size)
    except ValueError:
        raise ValueError(f"this model makes {size}px images; ShapesWorld evaluations need an image size that is "
                         f"a multiple of 16 and at least {shapes.MIN_SIZE}") from None


def batch_seed(seed: int, index: int) -> int:
    """Independent seed for batch ``index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def chunks(count: int, size: int) -> list[range]:
    """Consecutive index ranges of at most ``size`` covering ``range(count)``."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def generate_batches(pipe: Any, texts: Sequence[str], images_per_prompt: int, batch_size: int, seed: int,
                     guidance_scale: float, temperature: float, progress: bool = True,
                     desc: str = "generating", jacobi_window: int = 0,
                     forward_passes: list[int] | None = None) -> Iterator[tuple[range, list[list[Image.Image]]]]:
    """Yield (prompt indices, images per prompt) for batches of ``batch_size`` prompts, each batch seeded apart.

    ``forward_passes``, when given, receives each batch's number of sequential forward passes.
    """
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress)
    try:
        for index, chunk in enumerate(chunks(len(texts), batch_size)):
            stats: dict = {}
            codes = pipe.generate_image_tokens([texts[i] for i in chunk], num_images_per_prompt=images_per_prompt,
                                               guidance_scale=guidance_scale, temperature=temperature,
                                               seed=batch_seed(seed, index), progress=False,
                                               jacobi_window=jacobi_window, stats=stats)
            if forward_passes is not None and "forward_passes" in stats:
                forward_passes.append(stats["forward_passes"])
            images = pipe.decode_images(codes)
            yield chunk, [images[k * images_per_prompt:(k + 1) * images_per_prompt] for k in range(len(chunk))]
            bar.update(len(chunk))
    finally:
        bar.close()


@torch.inference_mode()
def vq_round_trip(pipe: Any, images: Sequence[Image.Image], batch_size: int,
                  progress: bool = True) -> list[Image.Image]:
    """Images passed through the model's own VQ: preprocess to [-1, 1], encode to tokens, decode."""
    vq = pipe.model.gen_vision_model
    weight = next(vq.parameters())
    size = pipe.config.image_size
    out: list[Image.Image] = []
    for chunk in tqdm(chunks(len(images), batch_size), desc="VQ round trip", unit="batch", disable=not progress):
        pixels = preprocess_images([images[i] for i in chunk], size).to(weight.device, weight.dtype)
        _, indices, *_ = vq.encode(pixels)
        out += pipe.decode_images(indices)
    return out


def mean_scores(groups: Sequence[str], verdicts: Sequence[bool], order: Sequence[str]) -> dict[str, float]:
    """Accuracy per group (in ``order``, groups that occur) plus ``overall``, the unweighted mean of groups."""
    found: dict[str, list[bool]] = {}
    for group, verdict in zip(groups, verdicts, strict=True):
        found.setdefault(group, []).append(bool(verdict))
    scores = {group: float(np.mean(found[group])) for group in order if group in found}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores


def counts(groups: Sequence[str], verdicts: Sequence[bool], order: Sequence[str]) -> dict[str, dict[str, int]]:
    """Correct and total items per group, in ``order``."""
    table = {group: {"correct": 0, "total": 0} for group in order if group in groups}
    for group, verdict in zip(groups, verdicts, strict=True):
        table[group]["total"] += 1
        table[group]["correct"] += int(bool(verdict))
    return table



def write_json(path: Path, report: dict) -> Path:
    """Write a report as indented UTF-8 JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path
