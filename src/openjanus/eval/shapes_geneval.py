"""Shapes-GenEval: text-to-image on the held-out ShapesWorld prompts, scored exactly by the reference checker.

Spec: shared/spec/shapes-world.md, sections 4 and 6. Every report carries two ceilings next to the
model's score: the checker on ground-truth renders of scenes for the same prompts (oracle) and on
those renders after a round trip through the model's own VQ tokenizer (tokenizer ceiling). It also
tallies what the model draws for each named word (``drawn``, see ``tally_drawn``), which shows which
words the model binds to the image and which it confuses.
Prompts are generated in batches, each sampled with a seed derived from (seed, batch index), so a
run is reproduced exactly by the same seed and batch size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..worlds import shapes
from .common import (
    check_positive,
    check_seed,
    counts,
    generate_batches,
    mean_scores,
    shapes_image_size,
    vq_round_trip,
    weight_format,
    write_json,
)
from .grids import Cell, labelled_grid

REPORT_FILE = "shapes_geneval.json"
GRID_FILE = "shapes_geneval_samples.png"
GRID_PROMPTS_PER_TASK = 2
# Ceiling scenes use their own fixed stream, so ceilings never depend on the sampling seed.
CEILING_SEED = 4_000_037
NOTHING_DRAWN = "none"


def tally_drawn(drawn: dict, prompt: shapes.GenPrompt, objects: list[shapes.DetectedObject]) -> None:
    """Tally what the image shows for the prompt's one named word (single_object and colors prompts).

    single_object: the shape of the largest object. colors: the colour of the largest object of the
    named shape. ``none`` when there is no such object.
    """
    if prompt.task == "single_object":
        word, attribute = prompt.spec["shapes"][0], "shape"
    elif prompt.task == "colors":
        word, attribute = prompt.spec["colors"][0], "color"
        objects = [o for o in objects if o.shape == prompt.spec["shapes"][0]]
    else:
        return
    largest = max(objects, key=lambda o: o.area, default=None)
    seen = NOTHING_DRAWN if largest is None else getattr(largest, attribute)
    row = drawn.setdefault(prompt.task, {}).setdefault(word, {})
    row[seen] = row.get(seen, 0) + 1


def ground_truth_renders(prompts: list[shapes.GenPrompt], size: int) -> list[Image.Image]:
    """One ground-truth render per prompt at ``size``: a random scene satisfying it, from a fixed seed."""
    return [shapes.render(shapes.scene_for_prompt(np.random.default_rng([CEILING_SEED, index]), prompt, size))
            for index, prompt in enumerate(prompts)]


def shapes_geneval(pipe: Any, n_per_task: int = 100, images_per_prompt: int = 4, guidance_scale: float = 5.0,
                   temperature: float = 1.0, seed: int = 0, batch_size: int = 8, out_dir: str | Path | None = None,
                   progress: bool = True, jacobi_window: int = 0) -> dict:
    """Generate for the held-out shapes-GenEval prompts, score them, and report per task with both ceilings.

    ``jacobi_window`` > 1 generates with speculative Jacobi decoding (same distribution, fewer passes).
    """
    size = shapes_image_size(pipe)
    check_positive(n_per_task=n_per_task, images_per_prompt=images_per_prompt, batch_size=batch_size)
    check_seed(seed)
    started = time.perf_counter()
    prompts = shapes.test_prompts(n_per_task)
    per_task = min(GRID_PROMPTS_PER_TASK, n_per_task)
    shown = {t * n_per_task + j for t in range(len(shapes.TASKS)) for j in range(per_task)}

    verdicts: list[list[bool]] = []
    drawn: dict[str, dict[str, dict[str, int]]] = {}
    grid_rows: list[tuple[str, list[Cell]]] = []
    scoring_s = 0.0
    forward_passes: list[int] = []
    batches = generate_batches(pipe, [p.text for p in prompts], images_per_prompt, batch_size, seed,
                               guidance_scale, temperature, progress, desc="shapes-geneval",
                               jacobi_window=jacobi_window, forward_passes=forward_passes)
    for chunk, images_per in batches:
        tick = time.perf_counter()
        for index, images in zip(chunk, images_per):
            prompt = prompts[index]
            detections = [shapes.detect_objects(image) for image in images]
            verdicts.append([shapes.score_detections(objects, prompt) for objects in detections])
            for objects in detections:
                tally_drawn(drawn, prompt, objects)
            if index in shown:
                cells = [Cell(image, correct=ok) for image, ok in zip(images, verdicts[-1])]
                grid_rows.append((f"{prompt.task}: {prompt.text}", cells))
        scoring_s += time.perf_counter() - tick
    generation_s = time.perf_counter() - started - scoring_s

    tasks = [p.task for p in prompts for _ in range(images_per_prompt)]
    flat = [ok for row in verdicts for ok in row]
    report: dict[str, Any] = {
        "benchmark": "shapes-geneval",
        "scores": mean_scores(tasks, flat, shapes.TASKS),
        "counts": counts(tasks, flat, shapes.TASKS),
    }
    report["overall"] = report["scores"]["overall"]
    report["drawn"] = {task: {word: dict(sorted(row.items())) for word, row in sorted(words.items())}
                       for task, words in drawn.items()}

    tick = time.perf_counter()
    renders = ground_truth_renders(prompts, size)
    report["oracle_ceiling"] = shapes.score_images(zip(renders, prompts))
    reconstructions = vq_round_trip(pipe, renders, batch_size * images_per_prompt, progress)
    report["tokenizer_ceiling"] = shapes.score_images(zip(reconstructions, prompts))
    ceilings_s = time.perf_counter() - tick

    report["settings"] = {
        "n_per_task": n_per_task, "prompts": len(prompts), "images_per_prompt": images_per_prompt,
        "images": len(flat), "guidance_scale": guidance_scale, "temperature": temperature, "seed": seed,
        "batch_size": batch_size, "image_size": size, "image_tokens": pipe.config.num_image_tokens,
        "prompt_split": "test", "prompt_seed": shapes.SPLIT_SEEDS["test"], "device": str(pipe.device),
        "weights": weight_format(pipe), "jacobi_window": jacobi_window,
    }
    report["timing"] = {
        "generation_s": round(generation_s, 3), "scoring_s": round(scoring_s, 3), "ceilings_s": round(ceilings_s, 3),
        "total_s": round(time.perf_counter() - started, 3),
        "images_per_s": round(len(flat) / generation_s, 3) if generation_s > 0 else None,
        # Sequential forward passes per batch (all its images advance together), the prefill included.
        "forward_passes_per_batch": round(sum(forward_passes) / len(forward_passes), 2) if forward_passes else None,
    }
    report["per_prompt"] = [{"task": p.task, "prompt": p.text, "correct": v} for p, v in zip(prompts, verdicts)]
    if out_dir is not None:
        out = Path(out_dir)
        title = (f"shapes-geneval, seed {seed}, guidance {guidance_scale}, temperature {temperature}: "
                 f"overall {report['overall']:.3f}. Green frame: correct, red: wrong.")
        grid = labelled_grid(grid_rows, tile=min(size, 192), title=title)
        out.mkdir(parents=True, exist_ok=True)
        grid.save(out / GRID_FILE)
        report["files"] = {"report": str(out / REPORT_FILE), "grid": str(out / GRID_FILE)}
        write_json(out / REPORT_FILE, report)
    return report
