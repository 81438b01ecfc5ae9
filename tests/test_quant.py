"""Weight-only int8: the layer's arithmetic, quality against the unquantized model, memory, and the wiring.

Measured on the tiny random checkpoint (conftest, std 0.2 weights), 8 prompts x 16 image tokens:
relative L2 error of the logits against the unquantized model 1.1% (text) / 0.9% (image) in
float32 and 1.4% / 1.2% in bf16 (bf16 itself is about 0.9% / 0.7% away from float32); greedy image
tokens agree 0.91 (float32) and 0.95 (bf16); quantized layers hold 0.515x their bf16 bytes
(0.5 + 1/in_features for the bf16 scales; 0.5005x at 1B widths).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from openjanus import JanusPipeline
from openjanus.cli import app
from openjanus.model import Int8Linear, JanusModel, quantize_int8

PROMPTS = ["a photo of a red circle", "a photo of two blue squares left of a green triangle", "a big yellow star",
           "three small green circles", "a purple triangle above a red square", "an orange square",
           "a blue circle right of a star", "two red triangles"]
# Measured floors above, with margin: logits error (relative L2) and greedy image-token agreement.
MAX_LOGITS_ERROR = 0.03
MIN_GREEDY_AGREEMENT = {"float32": 0.75, "bfloat16": 0.8}


def _linear(in_features: int, out_features: int, dtype=torch.float32, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 10, out_features, dtype=dtype)[:, None])  # rows of different ranges
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_codes_are_round_to_nearest_per_output_channel(dtype):
    layer = _linear(64, 48, dtype)
    quant = Int8Linear.from_linear(layer)
    assert quant.weight.dtype == torch.int8 and quant.scales.shape == (48,) and quant.scales.dtype == dtype
    assert int(quant.weight.abs().max()) == 127
    error = (quant.dequantized() - layer.weight.detach().float()).abs()
    assert bool((error <= quant.scales.float()[:, None] * 0.51).all())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("in_features", [64, 40])  # 40: not a multiple of 16, where the CPU kernel would crash
def test_int8_linear_equals_linear_with_dequantized_weight(dtype, tol, in_features):
    layer = _linear(in_features, 48, dtype)
    quant = Int8Linear.from_linear(layer)
    x = torch.randn(2, 20, in_features).to(dtype)  # 40 rows: the dequantizing path
    expected = nn.functional.linear(x.float(), quant.dequantized(), layer.bias.detach().float())
    for inputs in (x, x[:1, :2]):  # 2 rows: the int8 kernel where it applies
        out = quant(inputs)
        want = expected[:1, :2] if inputs.shape[1] == 2 else expected
        assert out.dtype == dtype and out.shape == want.shape
        got = out.float()
        assert float((got - want).norm() / want.norm()) < tol


@pytest.mark.parametrize("dtype, rows, kernel", [(torch.bfloat16, 8, True), (torch.bfloat16, 32, False),
                                                  (torch.float32, 2, True), (torch.float32, 8, False)])
def test_int8_linear_takes_the_kernel_only_where_it_is_faster(monkeypatch, dtype, rows, kernel):
    # torch's int8 kernel is slow per row in float32 (see quant.py): decoding several rows in float32
    # through it took twice as long as converting the weight.
    calls = []
    original = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *args: calls.append(1) or original(*args))
    Int8Linear.from_linear(_linear(64, 48, dtype))(torch.randn(rows, 64).to(dtype))
    assert bool(calls) == kernel


def test_quantize_int8_only_touches_the_llm_and_heads(tiny_model_dir):
    model = JanusPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16", quantization="int8").model
    quantized = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    layers = model.config.llm.num_layers
    assert len(quantized) == 7 * layers + 3  # q k v o gate up down per layer, lm_head, the two gen_head layers
    assert all(name.startswith(("language_model.", "gen_head.")) for name in quantized)
    assert not any(isinstance(m, nn.Linear) for m in (*model.language_model.modules(), *model.gen_head.modules()))
    rest = [t for name, t in model.state_dict().items()
            if not any(name.startswith(q + ".") for q in quantized)]
    assert all(t.dtype == torch.bfloat16 for t in rest if t.is_floating_point())
    assert model.backbone.embed_tokens.weight.dtype == torch.bfloat16


def test_tied_text_head_keeps_sharing_the_embeddings():
    from conftest import tiny_config

    config = tiny_config()
    config.llm.tie_word_embeddings = True
    model = quantize_int8(JanusModel(config))
    assert model.language_model.lm_head.weight is model.backbone.embed_tokens.weight
    assert isinstance(model.backbone.layers[0].mlp.up_proj, Int8Linear)


def test_each_layer_is_freed_before_the_next_is_quantized(tiny_model_dir, monkeypatch):
    import weakref

    from openjanus.weights import load_checkpoint

    model = load_checkpoint(tiny_model_dir, dtype="bfloat16").model
    done, alive_at_each_call = [], []
    original = Int8Linear.from_linear.__func__

    def tracked(cls, linear):
        alive_at_each_call.append(sum(ref() is not None for ref in done))
        done.append(weakref.ref(linear.weight))
        return original(cls, linear)

    monkeypatch.setattr(Int8Linear, "from_linear", classmethod(tracked))
    quantize_int8(model)
    assert len(alive_at_each_call) == 7 * model.config.llm.num_layers + 3
    assert max(alive_at_each_call) == 0 and all(ref() is None for ref in done)


def test_quantized_layers_take_about_half_the_bf16_bytes(tiny_model_dir):
    plain = JanusPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16").model
    quant = JanusPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16", quantization="int8").model
    names = [name for name, m in quant.named_modules() if isinstance(m, Int8Linear)]

    def nbytes(model):
        modules = dict(model.named_modules())
        return sum(t.numel() * t.element_size() for name in names
                   for t in (*modules[name].parameters(), *modules[name].buffers()))

    ratio = nbytes(quant) / nbytes(plain)
    print(f"int8 / bf16 bytes of the quantized layers: {ratio:.4f}")
    assert 0.5 < ratio < 0.52  # int8 codes plus one bf16 scale per row (1/in_features, here 64 and 128)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pair(request, tiny_model_dir):
    load = dict(device="cpu", dtype=request.param)
    return (request.param, JanusPipeline.from_pretrained(tiny_model_dir, **load),
            JanusPipeline.from_pretrained(tiny_model_dir, **load, quantization="int8"))


@torch.no_grad()
def test_int8_logits_close_to_the_unquantized_model(pair):
    dtype, plain, quant = pair
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 397], [1, 21, 31, 41, 51, 61, 71, 397]])
    for head in ("text_logits", "image_logits"):
        want, got = (getattr(p.model, head)(p.model.hidden_states(p.model.embed_text(ids))).float()
                     for p in (plain, quant))
        error = float((got - want).norm() / want.norm())
        print(f"{dtype} {head}: relative error {error:.4f}")
        assert 1e-4 < error < MAX_LOGITS_ERROR  # nonzero: the int8 weights are really in use


def test_int8_greedy_image_tokens_mostly_agree(pair):
    dtype, plain, quant = pair
    want = plain.generate_image_tokens(PROMPTS, temperature=0, progress=False)
    got = quant.generate_image_tokens(PROMPTS, temperature=0, progress=False)
    agreement = float((got == want).float().mean())
    print(f"{dtype}: greedy image-token agreement {agreement:.3f} over {want.numel()} tokens")
    assert agreement >= MIN_GREEDY_AGREEMENT[dtype]


def test_unknown_quantization_is_one_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match=r"^unknown quantization 'int4'; choose one of: none, int8$"):
        JanusPipeline.from_pretrained(tiny_model_dir, device="cpu", quantization="int4")
    result = CliRunner().invoke(app, ["generate", "a circle", "--model", str(tiny_model_dir),
                                      "--quantization", "int4"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: unknown quantization 'int4'; choose one of: none, int8"]


@pytest.fixture
def loads(monkeypatch):
    """Every JanusPipeline.from_pretrained call's quantization, the calls still going through."""
    seen = []
    original = JanusPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("quantization"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(JanusPipeline, "from_pretrained", classmethod(spy))
    return seen


@pytest.mark.parametrize("args", [["generate", "a circle", "-o", "{tmp}"], ["ask", "{image}", "What?"], ["chat"]])
def test_cli_commands_pass_quantization(args, loads, tiny_model_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    args = [a.format(tmp=tmp_path, image=tmp_path / "x.png") for a in args]
    result = CliRunner().invoke(app, [*args, "--model", str(tiny_model_dir), "--quantization", "int8"],
                                input="/exit\n")
    assert result.exit_code == 0, result.output
    assert loads == ["int8"]


def test_serve_passes_quantization(loads, tiny_model_dir, monkeypatch):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--quantization", "int8"])
    assert result.exit_code == 0, result.output
    assert loads == ["int8"]


@pytest.mark.parametrize("flag, expected", [([], ("int8",)), (["--quantization", "none"], ())])
def test_bench_quantization_rows_flag(flag, expected, monkeypatch):
    pytest.importorskip("transformers")
    import openjanus.bench as bench

    calls = []
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: calls.append(kwargs["quantizations"]))
    monkeypatch.setattr(bench, "format_table", lambda results: "table")
    result = CliRunner().invoke(app, ["bench", *flag])
    assert result.exit_code == 0, result.output
    assert calls == [expected]
    bad = CliRunner().invoke(app, ["bench", "--quantization", "int4"])
    assert bad.exit_code == 1 and "unknown quantization 'int4'" in bad.output
