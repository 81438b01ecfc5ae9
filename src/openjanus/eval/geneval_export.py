"""GenEval export: samples in the folder layout of djghosh13/geneval's evaluator, and ShapesWorld prompts as metadata.

The layout its README documents and ``evaluation/evaluate_images.py`` reads::

    <out>/00000/metadata.jsonl       the prompt's metadata line (one JSON object)
    <out>/00000/samples/0000.png     images_per_prompt samples
    <out>/00001/...

Folders are numbered by the prompt's line in the metadata file. The evaluator reads every digit-named
folder, ``json.load``s its ``metadata.jsonl`` and scores every ``samples/<digits>.png``.

ShapesWorld prompts map onto GenEval metadata one to one (shapes are the classes), so an export of
them can be scored by any GenEval-style detector, or here by `score_shapes_export` with the reference
checker. The official Mask2Former knows only COCO classes, so it cannot score shapes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..worlds import shapes
from .common import check_positive, check_seed, counts, generate_batches, mean_scores

METADATA_FILE = "metadata.jsonl"
SAMPLES_DIR = "samples"
REQUIRED_KEYS = ("tag", "include", "prompt")
_SAMPLE_NAME = re.compile(r"\d+\.png")


def load_metadata(source: str | Path | Sequence[Mapping[str, Any]]) -> list[dict]:
    """GenEval metadata dicts from a JSONL file or a list, each checked for tag, include and prompt."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"metadata file not found: {path}")
        entries = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number} is not JSON: {error}") from None
        where = f"{path} entry"
    else:
        entries, where = list(source), "metadata entry"
    if not entries:
        raise ValueError("no prompts in the metadata")
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} {index} is not a JSON object")
        missing = [key for key in REQUIRED_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{where} {index} lacks {', '.join(missing)} (GenEval metadata needs {REQUIRED_KEYS})")
        if not isinstance(entry["prompt"], str) or not entry["prompt"].strip():
            raise ValueError(f"{where} {index} has no prompt text")
        if not isinstance(entry["include"], list):
            raise ValueError(f"{where} {index}: 'include' must be a list of clauses")
    return [dict(entry) for entry in entries]


def export_geneval(pipe: Any, prompts: str | Path | Sequence[Mapping[str, Any]], out_dir: str | Path,
                   images_per_prompt: int = 4, guidance_scale: float = 5.0, temperature: float = 1.0, seed: int = 0,
                   batch_size: int = 8, progress: bool = True) -> dict:
    """Generate samples for GenEval metadata and write them in the official evaluator's layout; returns a summary."""
    metadata = load_metadata(prompts)
    check_positive(images_per_prompt=images_per_prompt, batch_size=batch_size)
    check_seed(seed)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose a new output folder")
    started = time.perf_counter()
    batches = generate_batches(pipe, [m["prompt"] for m in metadata], images_per_prompt, batch_size, seed,
                               guidance_scale, temperature, progress, desc="geneval export")
    for chunk, images_per in batches:
        for index, images in zip(chunk, images_per):
            _write_prompt_folder(out / f"{index:05d}", metadata[index], images)
    return {
        "out_dir": str(out), "prompts": len(metadata), "images": len(metadata) * images_per_prompt,
        "settings": {"images_per_prompt": images_per_prompt, "guidance_scale": guidance_scale,
                     "temperature": temperature, "seed": seed, "batch_size": batch_size,
                     "image_size": pipe.config.image_size},
        "timing": {"total_s": round(time.perf_counter() - started, 3)},
    }


def _write_prompt_folder(folder: Path, metadata: Mapping[str, Any], images: Sequence[Image.Image]) -> None:
    samples = folder / SAMPLES_DIR
    samples.mkdir(parents=True, exist_ok=True)
    (folder / METADATA_FILE).write_text(json.dumps(metadata) + "\n", encoding="utf-8")
    for k, image in enumerate(images):
        image.save(samples / f"{k:04d}.png")


# ---------------------------------------------------------------------------
# ShapesWorld prompts as GenEval metadata


def shapes_metadata(prompt: shapes.GenPrompt) -> dict:
    """GenEval metadata (tag, include, exclude, prompt) of a shapes-GenEval prompt, with GenEval's clause rules."""
    spec = prompt.spec
    names, colors = spec["shapes"], spec.get("colors", ())
    exclude = None
    if prompt.task == "counting":
        include = [{"class": names[0], "count": spec["count"]}]
        exclude = [{"class": names[0], "count": spec["count"] + 1}]
    elif prompt.task == "position":
        # As GenEval: the reference object first, then the placed object relative to clause 0.
        include = [{"class": names[1], "count": 1}, {"class": names[0], "count": 1, "position": [spec["relation"], 0]}]
    else:
        include = [{"class": name, "count": 1} for name in names]
        for clause, color in zip(include, colors):
            clause["color"] = color
    metadata: dict[str, Any] = {"tag": prompt.task, "include": include}
    if exclude:
        metadata["exclude"] = exclude
    metadata["prompt"] = prompt.text
    return metadata


def prompt_from_metadata(metadata: Mapping[str, Any]) -> shapes.GenPrompt:
    """The shapes-GenEval prompt that GenEval metadata describes; ValueError when it is not a ShapesWorld prompt."""
    task, include = metadata.get("tag"), metadata.get("include")
    error = ValueError(f"not a ShapesWorld GenEval prompt: {json.dumps(dict(metadata))}")
    try:
        names = tuple(clause["class"] for clause in include)
        if task == "counting":
            spec = {"shapes": names, "count": int(include[0]["count"])}
        elif task == "position":
            spec = {"shapes": (names[1], names[0]), "relation": include[1]["position"][0]}
        elif task in ("colors", "color_attr"):
            spec = {"shapes": names, "colors": tuple(clause["color"] for clause in include)}
        else:
            spec = {"shapes": names}
    except (KeyError, IndexError, TypeError, ValueError):
        raise error from None
    if task not in shapes.TASKS or not names or any(name not in shapes.SHAPES for name in names):
        raise error
    return shapes.GenPrompt(task, metadata["prompt"], spec)


def shapes_geneval_metadata(n_per_task: int = 100) -> list[dict]:
    """GenEval metadata of the held-out shapes-GenEval prompts (``n_per_task`` per task, in task order)."""
    check_positive(n_per_task=n_per_task)
    return [shapes_metadata(prompt) for prompt in shapes.test_prompts(n_per_task)]


def write_metadata(path: str | Path, metadata: Sequence[Mapping[str, Any]]) -> Path:
    """Write metadata dicts as a JSONL file (GenEval's evaluation_metadata.jsonl format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(entry)) + "\n" for entry in metadata), encoding="utf-8")
    return path


def score_shapes_export(folder: str | Path) -> dict:
    """Score an exported folder of ShapesWorld prompts with the reference checker, read as GenEval reads it."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"not a folder: {root}")
    tasks, verdicts = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        prompt = prompt_from_metadata(json.loads((sub / METADATA_FILE).read_text(encoding="utf-8")))
        for sample in sorted((sub / SAMPLES_DIR).iterdir()):
            if sample.is_file() and _SAMPLE_NAME.fullmatch(sample.name):
                with Image.open(sample) as image:
                    verdicts.append(shapes.score_image(image, prompt))
                tasks.append(prompt.task)
    if not verdicts:
        raise ValueError(f"no samples found under {root}")
    return {"scores": mean_scores(tasks, verdicts, shapes.TASKS), "counts": counts(tasks, verdicts, shapes.TASKS)}
