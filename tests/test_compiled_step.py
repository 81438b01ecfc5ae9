"""The static-shape decode steps (the ones torch.compile and CUDA graphs run) against the plain eager loops."""

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_config

from openjanus.generation import generate_image_tokens, stream_text
from openjanus.generation.decode import StaticStep, _guided_logits, _prefill, static_image_step, static_text_step
from openjanus.model import JanusModel
from openjanus.pipeline import JanusPipeline
from openjanus.worlds.shapes import render, sample_scene

PAD = 396
PROMPTS = torch.tensor([[PAD, PAD, 1, 20, 30, 397], [1, 20, 30, 40, 50, 397], [1, 60, 70, 80, 90, 397]])
MASK = PROMPTS != PAD


def tiny_model() -> JanusModel:
    model = JanusModel(tiny_config()).eval()
    randomize(model, seed=5)
    return model


@torch.inference_mode()
def test_static_step_logits_match_the_dynamic_step():
    """Same cache contents, one step each way: the whole-cache masked attention changes nothing."""
    model = tiny_model()
    ids, mask = torch.cat([PROMPTS, PROMPTS]), torch.cat([MASK, MASK])
    dynamic_cache, _, positions = _prefill(model, model.embed_text(ids), mask, 4)
    static_cache, _, _ = _prefill(model, model.embed_text(ids), mask, 4, bucket=64)
    assert static_cache.max_length == 64  # cache lengths are rounded up: prompts share one cache shape
    previous = torch.tensor([3, 7, 11])
    for step in range(3):
        embeds = model.embed_image_tokens(previous).repeat(2, 1)[:, None]
        expected = _guided_logits(model, model.hidden_states(embeds, positions + step, None, dynamic_cache)[:, -1],
                                  2.0)
        slot = torch.tensor([static_cache.length])
        # The whole cache, and only the slots up to this one: masked slots change nothing.
        for span in (64, static_cache.length + 1):
            got = static_image_step(model, static_cache, slot, span, previous, positions + step, 2.0)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        static_cache.length += 1
        previous = expected.argmax(dim=-1)


def test_static_step_spans():
    """The slots a step reads: the filled ones and the new one, rounded up to the next of `spans` parts."""
    model = tiny_model()
    cache = _prefill(model, model.embed_text(PROMPTS[1:]), MASK[1:], 100, bucket=64)[0]
    assert cache.max_length == 128 and cache.length == 6
    whole, quarters = StaticStep(static_image_step), StaticStep(static_image_step, spans=4)
    for length, expected in ((6, 32), (31, 32), (32, 64), (95, 96), (96, 128), (127, 128)):
        cache.length = length
        assert (whole.span(cache), quarters.span(cache)) == (128, expected)


@pytest.mark.parametrize("spans", [1, 4])
def test_greedy_static_loop_equals_plain_loop(spans):
    model = tiny_model()
    plain = generate_image_tokens(model, PROMPTS, MASK, PAD, 3.0, 0)
    static = generate_image_tokens(model, PROMPTS, MASK, PAD, 3.0, 0, image_step=StaticStep(static_image_step, spans))
    assert torch.equal(plain, static)


@pytest.mark.parametrize("spans", [1, 4])
def test_greedy_static_text_loop_equals_plain_loop(spans):
    model = tiny_model()
    embeds = model.embed_text(PROMPTS)
    plain = torch.stack(list(stream_text(model, embeds, MASK, 12, eos_id=-1)))
    static = torch.stack(list(stream_text(model, embeds, MASK, 12, eos_id=-1,
                                          text_step=StaticStep(static_text_step, spans))))
    assert plain.shape == (12, 3) and torch.equal(plain, static)


def test_compiled_pipeline_equals_eager(tiny_model_dir):
    """torch.compile on CPU (inductor, frozen weights): the eager pipeline's greedy images, across two batch shapes."""
    eager = JanusPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    compiled = JanusPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="float32", compile=True)
    assert eager.image_step is None and compiled.image_step is not None
    for prompts in (["a red circle"], ["a blue square", "two green triangles above a circle"]):
        expected = eager.generate_image_tokens(prompts, temperature=0, progress=False)
        got = compiled.generate_image_tokens(prompts, temperature=0, progress=False)
        assert torch.equal(got, expected)


def test_compiled_answers_equal_eager():
    """The compiled text step on the shipped model (whose answers are words, not a random model's repeats)."""
    eager = JanusPipeline.from_pretrained(device="cpu")
    compiled = JanusPipeline.from_pretrained(device="cpu", compile=True)
    assert eager.text_step is None and compiled.text_step is not None
    images = [render(sample_scene(np.random.default_rng(seed))) for seed in range(3)]
    conversations = [[{"role": "user", "content": question, "images": [image]}]
                     for question, image in zip(("How many objects are there?", "Describe the image.",
                                                 "What color is the circle?"), images)]
    expected = eager.answer(conversations, max_new_tokens=24)
    assert all(expected) and len(set(expected)) == 3 and compiled.answer(conversations, max_new_tokens=24) == expected
