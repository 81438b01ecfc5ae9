"""A tiny smoke run of the benchmark, and the guard that the fast decode path equals the plain forward."""

import pytest
import torch

from openjanus.generation import generate_image_tokens


def test_bench_smoke(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import openjanus.bench as bench

    monkeypatch.setattr(bench, "CACHE", tmp_path)
    results = bench.run("tiny", batches=(1,), steps=(2, 4), repeats=1, out=tmp_path / "r.json", compile=True)
    assert (tmp_path / "r.json").exists()
    assert results["image_batch1"]["openjanus_s_per_step"] > 0 and results["text_decode"]["port_tokens_per_s"] > 0
    assert results["image_batch1"]["openjanus_int8_s_per_step"] > 0 and results["text_decode"]["int8_speedup"] > 0
    assert results["image_batch1"]["compiled_speedup"] > 0 and results["text_decode"]["compiled_speedup"] > 0
    assert 0.5 < results["int8_weights_gb"] / results["weights_gb"] < 1  # the vision and VQ models stay bf16
    assert set(results["load_peak_rss_gb"]) == {"none", "int8"} and results["load_peak_rss_gb"]["none"] > 0
    assert 0 < results["text_decode"]["openjanus_bandwidth_gb_s"]
    prefill = results["understanding_prefill"]
    assert prefill["prompt_tokens"] == 1 + 64 + 50  # BOS, the tiny ViT's 8 x 8 patches, the text
    assert prefill["openjanus_tokens_per_s"] > 0 and prefill["int8_speedup"] > 0 and prefill["speedup"] > 0
    table = bench.format_table(results)
    assert "openjanus" in table and "s/image int8" in table and "text decode tokens/s int8" in table
    assert "text decode tokens/s compiled" in table and "understanding prefill tokens/s int8" in table


def test_images_bench_smoke(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import openjanus.bench as bench

    monkeypatch.setattr(bench, "CACHE", tmp_path)
    results = bench.run_images("tiny", "cpu", images=2, repeats=1, out=tmp_path / "images.json")
    assert (tmp_path / "images.json").exists()
    assert set(results["seconds"]) == {"openjanus", "openjanus_compiled", "port"}
    assert all(seconds > 0 for seconds in results["seconds"].values())
    assert "openjanus_compiled" in bench.format_images_table(results)


def test_cached_greedy_image_tokens_equal_uncached_forward(tiny_model_dir):
    """The KV-cached loop must pick exactly what full recomputation of every prefix picks."""
    from openjanus.weights import load_checkpoint

    model = load_checkpoint(tiny_model_dir).model
    ids = torch.tensor([[1, 20, 30, 40, 50, 397]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    fast = generate_image_tokens(model, ids, mask, pad_id=396, guidance_scale=3.0, temperature=0)
    uncond = ids.clone()
    uncond[0, 1:-1] = 396
    embeds = model.embed_text(torch.cat([ids, uncond]))
    picked = []
    with torch.no_grad():
        for _ in range(fast.shape[1]):
            logits = model.image_logits(model.hidden_states(embeds)[:, -1])
            guided = logits[1] + 3.0 * (logits[0] - logits[1])
            picked.append(int(guided.argmax()))
            step = model.embed_image_tokens(torch.tensor([picked[-1]] * 2))[:, None]
            embeds = torch.cat([embeds, step], dim=1)
    assert fast[0].tolist() == picked
