"""Checkpoint layouts: exact round trips, parameter counts, safe loading and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import randomize, tiny_config

from openjanus.config import get_preset
from openjanus.model import JanusModel
from openjanus.weights import CheckpointError, iter_tensors, load_checkpoint, read_config, save_checkpoint

REFERENCE_COUNTS = {"janus-1.3b": (2_089_297_547, 882), "janus-pro-1b": (2_089_297_547, 882),
                    "janus-pro-7b": (7_420_434_059, 936)}


@pytest.mark.parametrize("preset", sorted(REFERENCE_COUNTS))
def test_presets_have_the_reference_parameter_count(preset):
    with torch.device("meta"):
        model = JanusModel(get_preset(preset))
    state = model.state_dict()
    count, tensors = REFERENCE_COUNTS[preset]
    assert sum(t.numel() for t in state.values()) == count
    assert len(state) == tensors


def _tensors(path):
    return dict(iter_tensors(path))


def _official_tiny(tmp_path, tokenizer_file):
    """A tiny model in the official layout, with the never-run attn_pool and codebook_used tensors."""
    config = tiny_config()
    config.vision.global_pool = "map"
    config.vq.codebook_show_usage = True
    model = JanusModel(config)
    randomize(model, seed=5)
    model.gen_vision_model.quantize.codebook_used.uniform_()
    return save_checkpoint(model, tmp_path / "official", "official", tokenizer_file=tokenizer_file)


def test_official_round_trip_is_exact(tmp_path, tokenizer_file):
    src = _official_tiny(tmp_path, tokenizer_file)
    config = json.loads((src / "config.json").read_text())
    assert config["model_type"] == "multi_modality" and "language_config" in config
    mid = save_checkpoint(load_checkpoint(src).model, tmp_path / "ours", tokenizer_file=tokenizer_file)
    back = save_checkpoint(load_checkpoint(mid).model, tmp_path / "back", "official", tokenizer_file=tokenizer_file)
    a, b = _tensors(src), _tensors(back)
    assert any(k.startswith("vision_model.vision_tower.attn_pool.") for k in a)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_round_trip_is_exact(tmp_path, hf_model_dir, tokenizer_file):
    checkpoint = load_checkpoint(hf_model_dir)
    assert checkpoint.layout == "hf"
    mid = save_checkpoint(checkpoint.model, tmp_path / "ours", tokenizer_file=tokenizer_file)
    from openjanus.processing.tokenizer import JanusTokenizer

    image_id = JanusTokenizer.from_file(tokenizer_file).image_id
    back = save_checkpoint(load_checkpoint(mid).model, tmp_path / "back", "hf", tokenizer_file=tokenizer_file,
                           image_token_id=image_id)
    a, b = _tensors(hf_model_dir), _tensors(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_export_loads_in_transformers(tmp_path, tiny_model_dir, tokenizer_file):
    transformers = pytest.importorskip("transformers")
    from openjanus.processing.tokenizer import JanusTokenizer

    ours = load_checkpoint(tiny_model_dir).model
    tok = JanusTokenizer.from_file(tokenizer_file)
    out = save_checkpoint(ours, tmp_path / "hf", "hf", tokenizer_file=tokenizer_file, image_token_id=tok.image_id)
    hf = transformers.JanusForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("a photo of a red circle")])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        mine = ours.text_logits(ours.hidden_states(ours.embed_text(ids)))
    assert (ref - mine).abs().max().item() <= 1e-4


def test_bin_and_sharded_checkpoints_load(tmp_path, tokenizer_file):
    src = _official_tiny(tmp_path, tokenizer_file)
    state = _tensors(src)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    sharded = tmp_path / "sharded"
    shutil.copytree(src, sharded)
    (sharded / "model.safetensors").unlink()
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, sharded / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    loaded = _tensors(save_checkpoint(load_checkpoint(sharded).model, tmp_path / "out", "official"))
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickle_payloads_are_refused(tmp_path, tokenizer_file):
    src = _official_tiny(tmp_path, tokenizer_file)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(bad)


def test_dtype_conversion_on_load(tiny_model_dir):
    model = load_checkpoint(tiny_model_dir, dtype="bfloat16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("damage, message", [
    ("no_dir", "does not exist"),
    ("no_config", "config.json is missing"),
    ("bad_json", "not valid JSON"),
    ("unknown_config", "not a Janus config"),
    ("unknown_key", "unknown config key 'llm.bogus'"),
    ("no_weights", "no weights"),
    ("truncated", "not a readable safetensors"),
    ("garbage", "not a readable safetensors"),
    ("missing_tensor", "missing: gen_embed.weight"),
    ("wrong_shape", "shape mismatch: gen_embed.weight"),
])
def test_bad_checkpoints_give_one_clear_error(tmp_path, tiny_model_dir, damage, message):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, path)
    weights, config = path / "model.safetensors", path / "config.json"
    state = _tensors(tiny_model_dir)
    if damage == "no_dir":
        path = tmp_path / "nowhere"
    elif damage == "no_config":
        config.unlink()
    elif damage == "bad_json":
        config.write_text("{not json")
    elif damage == "unknown_config":
        config.write_text(json.dumps({"model_type": "bert"}))
    elif damage == "unknown_key":
        raw = json.loads(config.read_text())
        raw["model"]["llm"]["bogus"] = 1
        config.write_text(json.dumps(raw))
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 100)
    elif damage in ("missing_tensor", "wrong_shape"):
        from safetensors.torch import save_file

        if damage == "missing_tensor":
            del state["gen_embed.weight"]
        else:
            state["gen_embed.weight"] = torch.zeros(3, 3)
        save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_read_config_of_official_layout_honours_size_keys(tmp_path, tokenizer_file):
    src = _official_tiny(tmp_path, tokenizer_file)
    config, layout = read_config(src)
    assert layout == "official"
    assert (config.vision.width, config.vq.ch, config.llm.num_kv_heads) == (32, 32, 2)
    assert config.sft_format == "deepseek"


def test_bare_model_from_pretrained(hf_model_dir):
    model = JanusModel.from_pretrained(hf_model_dir, dtype="float32")
    assert isinstance(model, JanusModel) and model.config.vision.image_size == 32
    state = _tensors(hf_model_dir)
    assert torch.equal(model.gen_embed.weight, state["model.generation_embeddings.weight"])
