"""The default model shipped inside the package: it loads offline and keeps its measured quality.

Floors sit below the scores measured on the full held-out sets (see the model card,
src/openjanus/assets/shapes-tiny/README.md), with margin for the smaller samples used here.
"""

from __future__ import annotations

import json

import pytest

from openjanus import JanusPipeline
from openjanus.eval import shapes_geneval, shapes_vqa
from openjanus.pipeline import DEFAULT_MODEL_DIR
from openjanus.worlds.shapes import COLORS

MAX_BYTES = 40 * 1024 * 1024
# Measured on these samples (torch 2.13.0, CPU): shapes-vqa 0.687, shapes-geneval 0.483, tokenizer ceiling 0.983
# (on the full held-out sets: 0.602, 0.518, 0.977; 120 images are a noisy sample).
# A random-weight model scores about 0 on shapes-geneval, and answering at chance about 0.35 on shapes-vqa.
VQA_FLOOR = 0.55
GENEVAL_FLOOR = 0.33
TOKENIZER_FLOOR = 0.90


@pytest.fixture(scope="module")
def pipe():
    return JanusPipeline.from_pretrained(device="cpu")


def test_the_shipped_model_is_small_safetensors_with_a_model_card():
    files = {p.name: p for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "README.md"} <= set(files)
    assert sum(p.stat().st_size for p in files.values()) <= MAX_BYTES
    with files["model.safetensors"].open("rb") as weights:
        header = json.loads(weights.read(int.from_bytes(weights.read(8), "little")))
    entries = {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    # bf16, except the VQ tokenizer: kept in float32 so that it encodes images to the codes it was trained on.
    vq = {dtype for name, dtype in entries.items() if name.startswith("gen_vision_model.")}
    rest = {dtype for name, dtype in entries.items() if not name.startswith("gen_vision_model.")}
    assert vq <= {"F32", "I64", "I32"} and rest <= {"BF16", "I64", "I32"}, (vq, rest)


def test_shapes_vqa_floor(pipe):
    report = shapes_vqa(pipe, n_per_family=25, progress=False)
    assert report["overall"] >= VQA_FLOOR, report["scores"]


def test_shapes_geneval_floor(pipe):
    report = shapes_geneval(pipe, n_per_task=10, images_per_prompt=2, progress=False)
    assert report["tokenizer_ceiling"]["overall"] >= TOKENIZER_FLOOR, report["tokenizer_ceiling"]
    assert report["overall"] >= GENEVAL_FLOOR, report["scores"]


def test_main_job_offline(pipe):
    """The README's main job: an image for a prompt, then a question about it, answered sensibly."""
    image = pipe.generate_images(["a photo of a red circle"], seed=0)[0]
    assert image.size == (pipe.config.image_size, pipe.config.image_size)
    answer = pipe.ask(image, "What color is the circle?")
    assert answer.strip().rstrip(".").lower() in COLORS, answer
