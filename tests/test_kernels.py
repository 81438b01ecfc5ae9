"""Packed bf16 linears for CPU inference: bit-identical to nn.Linear, wired into the pipeline, never saved."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from openjanus import JanusPipeline
from openjanus.generation import generate_image_tokens, stream_text
from openjanus.model.kernels import PackedLinear, pack_linears, packing_supported
from openjanus.weights import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not packing_supported("cpu", torch.bfloat16),
                                reason="this CPU build has no oneDNN bf16 kernels")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (40, 24), (256, 704)])
def test_packed_linear_is_bit_identical_to_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(*shape, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(layer)
    for rows in ((1,), (2,), (7,), (300,), (2, 5)):  # decode, guided decode, odd, prefill, batched sequences
        x = torch.randn(*rows, shape[0]).to(torch.bfloat16)
        assert torch.equal(packed(x), layer(x)), rows


def test_pack_linears_leaves_float32_and_tied_heads_alone(tiny_model_dir):
    fp32 = load_checkpoint(tiny_model_dir, dtype=torch.float32).model
    assert not any(isinstance(m, PackedLinear) for m in pack_linears(fp32).modules())
    from conftest import tiny_config

    from openjanus.model import JanusModel

    config = tiny_config()
    config.llm.tie_word_embeddings = True
    model = pack_linears(JanusModel(config).to(torch.bfloat16))
    assert type(model.language_model.lm_head) is nn.Linear
    assert model.language_model.lm_head.weight is model.backbone.embed_tokens.weight
    assert isinstance(model.language_model.model.layers[0].mlp.down_proj, PackedLinear)


def test_pipeline_packs_bf16_on_cpu_with_unchanged_outputs(tiny_model_dir):
    plain = load_checkpoint(tiny_model_dir, dtype=torch.bfloat16).model
    fast = JanusPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16").model
    assert not any(type(m) is nn.Linear for m in fast.modules())  # every linear is packed (no tied head here)
    ids = torch.randint(10, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        answers = [list(stream_text(m, m.embed_text(ids), mask, 8, eos_id=-1)) for m in (plain, fast)]
        tokens = [generate_image_tokens(m, ids, mask, 3, 5.0, 1.0, generator=torch.Generator().manual_seed(1))
                  for m in (plain, fast)]
    assert torch.equal(*tokens)
    assert all(torch.equal(a, b) for a, b in zip(*answers, strict=True))


def test_a_packed_model_refuses_to_be_saved(tiny_model_dir, tmp_path):
    model = JanusPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16").model
    with pytest.raises(ValueError, match="load_checkpoint"):
        save_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_packing_a_memory_mapped_checkpoint_does_not_keep_its_file_pages(tmp_path):
    """Packing reads every mapped weight; their file pages must not stay resident beside the packed copies."""
    from openjanus.weights import iter_tensors

    layers = {f"layer{i}.weight": torch.randn(1024, 2048).to(torch.bfloat16) for i in range(8)}  # 32 MB
    save_file(layers, str(tmp_path / "model.safetensors"))
    model = nn.Sequential(*[nn.Linear(2048, 1024, bias=False) for _ in layers])
    for layer, (_, tensor) in zip(model, iter_tensors(tmp_path), strict=True):
        layer.weight = nn.Parameter(tensor, requires_grad=False)  # memory-mapped, as load_checkpoint leaves them
    x = torch.randn(2, 2048).to(torch.bfloat16)
    with torch.no_grad():
        expected = [layer(x) for layer in model]  # touches every page of the file
    before = _rss_file_kb()
    pack_linears(model)
    assert before - _rss_file_kb() > 0.8 * 32 * 1024  # kB given back
    with torch.no_grad():
        assert all(torch.equal(layer(x), want) for layer, want in zip(model, expected, strict=True))


def _rss_file_kb() -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))
