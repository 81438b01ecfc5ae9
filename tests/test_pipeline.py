"""JanusPipeline behaviour on a tiny random checkpoint: reproducibility, batching, streaming, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from openjanus import JanusPipeline
from openjanus.pipeline import ModelNotAvailableError


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return JanusPipeline.from_pretrained(tiny_model_dir, device="cpu")


def _image(seed=0, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def test_generate_images_native_size_and_seed_reproducible(pipe):
    first = pipe.generate_images("a photo of a red circle", num_images_per_prompt=2, seed=7, progress=False)
    again = pipe.generate_images("a photo of a red circle", num_images_per_prompt=2, seed=7, progress=False)
    other = pipe.generate_images("a photo of a red circle", num_images_per_prompt=2, seed=8, progress=False)
    assert [im.size for im in first] == [(32, 32)] * 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, other))


def test_batched_generation_matches_one_by_one(pipe):
    prompts = ["a photo of a red circle", "a photo of two blue squares left of a green triangle"]
    kwargs = dict(guidance_scale=5.0, temperature=0.0, progress=False)
    batched = pipe.generate_image_tokens(prompts, num_images_per_prompt=2, **kwargs)
    single = torch.cat([pipe.generate_image_tokens(p, num_images_per_prompt=1, **kwargs) for p in prompts])
    assert batched.shape == (4, 16)
    assert torch.equal(batched[::2], single)  # prompt-major: rows 0,1 = prompt 0
    assert torch.equal(batched[0], batched[1])  # greedy: identical images per prompt


def test_cfg_weight_alias(pipe):
    a = pipe.generate_image_tokens("a photo of a circle", guidance_scale=2.0, temperature=0, progress=False)
    b = pipe.generate_image_tokens("a photo of a circle", cfg_weight=2.0, temperature=0, progress=False)
    c = pipe.generate_image_tokens("a photo of a circle", guidance_scale=9.0, temperature=0, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batched_answers_match_single(pipe):
    convs = [[{"role": "user", "content": "What color is the circle?", "images": [_image(1)]}],
             [{"role": "user", "content": "How many objects are there in this picture?", "images": [_image(2)]}]]
    batched = pipe.answer(convs, max_new_tokens=12)
    single = [pipe.answer([c], max_new_tokens=12)[0] for c in convs]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_stream_joins_to_full_answer_and_multi_turn(pipe):
    messages = [{"role": "user", "content": "Describe the image.", "images": [_image(3), _image(4)]},
                {"role": "assistant", "content": "two shapes"},
                {"role": "user", "content": "What color is the square?"}]
    full = pipe.chat(messages, max_new_tokens=16)
    pieces = list(pipe.chat(messages, stream=True, max_new_tokens=16))
    assert "".join(pieces) == full
    parts = [{"type": "image", "image": _image(3)}, {"type": "text", "text": "Describe the image."}]
    assert pipe.chat([{"role": "user", "content": parts}], max_new_tokens=8) == \
        pipe.ask(_image(3), "Describe the image.", max_new_tokens=8)


def test_stop_strings_cut_the_answer(pipe):
    full = pipe.ask(_image(5), "Describe the image.", max_new_tokens=20, temperature=1.0, seed=3)
    assert len(full) > 3
    stop = full[2:4]
    cut = pipe.ask(_image(5), "Describe the image.", max_new_tokens=20, temperature=1.0, seed=3, stop=[stop])
    assert cut == full[: full.find(stop)]


def test_sampled_answers_reproducible_with_seed(pipe):
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50)
    assert pipe.ask(_image(6), "What shape?", seed=1, **kwargs) == pipe.ask(_image(6), "What shape?", seed=1, **kwargs)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1"])
def test_non_rgb_images_are_converted(pipe, mode):
    assert isinstance(pipe.ask(_image(7, mode=mode), "What color?", max_new_tokens=4), str)


def test_tiny_one_pixel_image(pipe):
    assert isinstance(pipe.ask(_image(8, size=(1, 1)), "What color?", max_new_tokens=4), str)


@pytest.mark.parametrize("call, message", [
    (lambda p: p.generate_images("", progress=False), "prompt is empty"),
    (lambda p: p.generate_images("   ", progress=False), "prompt is empty"),
    (lambda p: p.generate_images([], progress=False), "no prompt"),
    (lambda p: p.generate_images("a circle", num_images_per_prompt=0), "num_images_per_prompt"),
    (lambda p: p.generate_images("a circle", num_images_per_prompt=-2), "num_images_per_prompt"),
    (lambda p: p.generate_images("a circle", temperature=-1), "temperature"),
    (lambda p: p.ask(_image(), "hi", temperature=-0.5), "temperature"),
    (lambda p: p.ask(_image(), "hi", top_p=1.5), "top_p"),
    (lambda p: p.ask(_image(), ""), "question is empty"),
    (lambda p: p.ask(b"not an image", "hi"), "image"),
    (lambda p: p.generate_images("circle " * 300, progress=False), "prompt too long"),
    (lambda p: p.ask(_image(), "circle " * 300), "context"),
    (lambda p: p.chat([{"role": "assistant", "content": "hi"}]), "role"),
])
def test_bad_input_gives_clear_error(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipe)


def test_chat_roles_follow_the_checkpoint(tmp_path, tiny_model_dir):
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    raw = json.loads((old / "config.json").read_text())
    raw["model"]["sft_format"] = "deepseek_old"
    (old / "config.json").write_text(json.dumps(raw))
    assert JanusPipeline.from_pretrained(old, device="cpu").chat_format.user_role == "User"
    assert JanusPipeline.from_pretrained(tiny_model_dir, device="cpu").chat_format.user_role == "<|User|>"


def test_missing_default_model_is_one_clear_error(monkeypatch, tmp_path):
    import openjanus.pipeline as pipeline

    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelNotAvailableError, match="no default model"):
        JanusPipeline.from_pretrained()
