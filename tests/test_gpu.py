"""The GPU path: parity with the port on CUDA, and the fast paths (CUDA graphs, Jacobi, int8) against eager.

Skipped without a CUDA device; `benchmarks/gpu.sh` runs it on a GPU machine.
"""

import numpy as np
import pytest
import torch
from test_model_parity import _understanding_inputs

from openjanus import JanusPipeline
from openjanus.bench import fix_port_image_generation
from openjanus.generation import generate_image_tokens, stream_text
from openjanus.processing.inputs import generation_batch
from openjanus.worlds.shapes import render, sample_scene

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT_SETS = (["a red circle"], ["a blue square", "two green triangles above a circle"])


@pytest.fixture(autouse=True, scope="module")
def exact_float32():
    """TF32 would round float32 matrix products and convolutions to 10-bit mantissas, on both systems."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cuda_pair(hf_model_dir):
    """openjanus and the port on the same tiny random weights, both on the GPU in float32."""
    transformers = pytest.importorskip("transformers")
    pipe = JanusPipeline.from_pretrained(hf_model_dir, device="cuda", dtype="float32")
    port = transformers.JanusForConditionalGeneration.from_pretrained(hf_model_dir).to("cuda").eval()
    return pipe, fix_port_image_generation(port)


def test_understanding_logits_and_greedy_text_match_the_port(cuda_pair):
    pipe, port = cuda_pair
    batch = _understanding_inputs(pipe).to("cuda")
    with torch.no_grad():
        ref = port(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits
        embeds = pipe.model.prepare_inputs_embeds(batch.input_ids, batch.pixel_values, batch.image_mask)
        ours = pipe.model.text_logits(pipe.model.hidden_states(embeds))
    assert ours.device.type == "cuda" and (ref - ours).abs().max().item() <= 1e-4
    ref_tokens = port.generate(input_ids=batch.input_ids, attention_mask=batch.padding_mask.long(),
                               pixel_values=batch.pixel_values, max_new_tokens=24, min_new_tokens=24,
                               do_sample=False, eos_token_id=None, pad_token_id=pipe.tokenizer.pad_id)
    ours_tokens = [int(t) for t in stream_text(pipe.model, embeds, batch.padding_mask, 24, eos_id=-1)]
    assert ours_tokens == ref_tokens[0, batch.input_ids.shape[1]:].tolist()


def test_guided_greedy_image_tokens_and_pixels_match_the_port(cuda_pair):
    pipe, port = cuda_pair
    tok = pipe.tokenizer
    batch = generation_batch(["a photo of a red circle", "two blue squares"], tok, pipe.chat_format).to("cuda")
    port.generation_config.generation_kwargs = {"boi_token_id": tok.boi_id}
    ref = port.generate(input_ids=batch.input_ids, attention_mask=batch.padding_mask.long(), generation_mode="image",
                        do_sample=False, guidance_scale=5.0, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    ours = generate_image_tokens(pipe.model, batch.input_ids, batch.padding_mask, tok.pad_id, 5.0, 0.0)
    assert torch.equal(ours, ref)
    with torch.no_grad():
        ref_pixels = port.decode_image_tokens(ref).permute(0, 3, 1, 2)
        our_pixels = pipe.model.decode_image_tokens(ours)
    assert (ref_pixels - our_pixels).abs().max().item() <= 1e-4


def test_cuda_graph_image_steps_equal_eager(tiny_model_dir):
    """torch.compile with CUDA graphs: the eager pipeline's greedy images, across two batch shapes."""
    eager = JanusPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype="float32")
    compiled = JanusPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype="float32", compile=True)
    for prompts in PROMPT_SETS:
        expected = eager.generate_image_tokens(prompts, temperature=0, progress=False)
        assert torch.equal(compiled.generate_image_tokens(prompts, temperature=0, progress=False), expected)


def test_cuda_graph_answers_equal_eager():
    """The compiled text step on the shipped model, whose answers are words, not a random model's repeats."""
    eager = JanusPipeline.from_pretrained(device="cuda", dtype="float32")
    compiled = JanusPipeline.from_pretrained(device="cuda", dtype="float32", compile=True)
    images = [render(sample_scene(np.random.default_rng(seed))) for seed in range(3)]
    conversations = [[{"role": "user", "content": question, "images": [image]}]
                     for question, image in zip(("How many objects are there?", "Describe the image.",
                                                 "What color is the circle?"), images)]
    expected = eager.answer(conversations, max_new_tokens=24)
    assert all(expected) and compiled.answer(conversations, max_new_tokens=24) == expected


def test_jacobi_and_int8_on_cuda_equal_their_cpu_results(tiny_model_dir):
    """Greedy Jacobi decoding equals the plain loop on the GPU; int8 picks what int8 picks on the CPU."""
    cuda = JanusPipeline.from_pretrained(tiny_model_dir, device="cuda", dtype="float32")
    batch = generation_batch(PROMPT_SETS[1], cuda.tokenizer, cuda.chat_format).to("cuda")
    plain = generate_image_tokens(cuda.model, batch.input_ids, batch.padding_mask, cuda.tokenizer.pad_id, 3.0, 0.0)
    jacobi = generate_image_tokens(cuda.model, batch.input_ids, batch.padding_mask, cuda.tokenizer.pad_id, 3.0, 0.0,
                                   jacobi_window=8)
    assert torch.equal(jacobi, plain)
    int8 = {device: JanusPipeline.from_pretrained(tiny_model_dir, device=device, dtype="float32",
                                                  quantization="int8").generate_image_tokens(
                                                      PROMPT_SETS[1], temperature=0, progress=False)
            for device in ("cpu", "cuda")}
    assert torch.equal(int8["cuda"].cpu(), int8["cpu"])
