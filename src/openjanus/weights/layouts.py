"""Config and key mappings between openjanus and the published checkpoint layouts.

openjanus parameter names are the official `multi_modality` names, so the
official mapping is the identity; the transformers `janus` layout renames
modules, splits the fused ViT qkv and squeezes the position embedding.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import ConfigError, JanusConfig, LLMConfig, VisionConfig, VQConfig

OPENJANUS, OFFICIAL, HF = "openjanus", "official", "hf"
LAYOUTS = (OPENJANUS, OFFICIAL, HF)


def detect_layout(config: dict[str, Any]) -> str:
    """Which layout a config.json belongs to."""
    if config.get("format") == OPENJANUS:
        return OPENJANUS
    if "language_config" in config:
        return OFFICIAL
    if config.get("model_type") == "janus" or "JanusForConditionalGeneration" in config.get("architectures", []):
        return HF
    raise ConfigError("config.json is not a Janus config (expected an openjanus, official "
                      "multi_modality or transformers janus config)")


# ---------------------------------------------------------------- configs

def _llm_from_hf(text: dict[str, Any]) -> LLMConfig:
    """LLaMA config from an HF LlamaConfig dict, writing the defaults out explicitly."""
    defaults = LLMConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32)
    heads = text.get("num_attention_heads", defaults.num_heads)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return LLMConfig(
        vocab_size=text.get("vocab_size", 32000),
        hidden_size=text.get("hidden_size", defaults.hidden_size),
        intermediate_size=text.get("intermediate_size", defaults.intermediate_size),
        num_layers=text.get("num_hidden_layers", defaults.num_layers),
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(text.get("rope_theta", rope.get("rope_theta", 10000.0))),
        max_position_embeddings=text.get("max_position_embeddings", 2048),
        context_length=min(4096, text.get("max_position_embeddings", 2048)),
    )


def _llm_to_hf(llm: LLMConfig) -> dict[str, Any]:
    return {
        "model_type": "llama", "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
        "hidden_act": "silu", "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
        "max_position_embeddings": llm.max_position_embeddings, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": llm.tie_word_embeddings, "head_dim": llm.head_dim,
    }


def config_from_official(cfg: dict[str, Any], sft_format: str = "deepseek") -> JanusConfig:
    """JanusConfig from an official config.json; size keys of section 11 override the named defaults."""
    try:
        vis = cfg["vision_config"].get("params", {})
        vq = cfg["gen_vision_config"].get("params", {})
        head = cfg["gen_head_config"].get("params", {})
        llm = _llm_from_hf(cfg["language_config"])
    except (KeyError, AttributeError) as exc:
        raise ConfigError(f"official config.json lacks {exc}") from None
    name = vis.get("model_name", "siglip_large_patch16_384")
    if "siglip_large_patch16" not in name and "layers" not in vis:
        raise ConfigError(f"unknown vision model '{name}' without explicit sizes")
    vd, qd = VisionConfig(), VQConfig()
    vision = VisionConfig(**{k: vis.get(k, getattr(vd, k)) for k in
                             ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "global_pool")})
    select_layer = vis.get("select_layer", -1)
    if select_layer <= 0:
        vision.layers = vision.layers + select_layer + 1
    elif select_layer < vision.layers:
        vision.layers = select_layer
    vq_cfg = VQConfig(**{k: vq.get(k, getattr(qd, k)) for k in
                         ("codebook_embed_dim", "codebook_l2_norm", "encoder_ch_mult", "decoder_ch_mult",
                          "z_channels", "ch", "num_res_blocks", "dropout_p")})
    vq_cfg.codebook_size = vq.get("codebook_size", vq.get("image_token_size", qd.codebook_size))
    vq_cfg.codebook_embed_dim = vq.get("codebook_embed_dim", vq.get("n_embed", qd.codebook_embed_dim))
    gen_head_dim = head.get("image_token_embed", llm.hidden_size)
    return JanusConfig(llm=llm, vision=vision, vq=vq_cfg,
                       gen_head_dim=0 if gen_head_dim == llm.hidden_size else gen_head_dim,
                       sft_format=sft_format).validate()


def config_to_official(config: JanusConfig, dtype: str) -> dict[str, Any]:
    """Official config.json, with the section 11 size keys written out."""
    d, v, q = config.llm.hidden_size, config.vision, config.vq

    def mlp(input_dim: int) -> dict[str, Any]:
        return {"projector_type": "mlp_gelu", "depth": 2, "input_dim": input_dim, "n_embed": d}

    language = _llm_to_hf(config.llm)
    language["torch_dtype"] = dtype
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "torch_dtype": dtype,
        "language_config": language,
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
            "image_size": v.image_size, "model_name": "siglip_large_patch16_384", "select_feature": "same",
            "select_layer": -1, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
            "heads": v.heads, "mlp_ratio": v.mlp_ratio, "global_pool": v.global_pool}},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": mlp(v.width)},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {
            "image_token_size": q.codebook_size, "n_embed": q.codebook_embed_dim,
            "codebook_size": q.codebook_size, "codebook_embed_dim": q.codebook_embed_dim,
            "codebook_l2_norm": q.codebook_l2_norm, "encoder_ch_mult": q.encoder_ch_mult,
            "decoder_ch_mult": q.decoder_ch_mult, "z_channels": q.z_channels, "ch": q.ch,
            "num_res_blocks": q.num_res_blocks, "dropout_p": q.dropout_p}},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                               "params": mlp(q.codebook_embed_dim)},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
            "n_embed": d, "image_token_embed": config.head_dim, "image_token_size": q.codebook_size}},
    }


def config_from_hf(cfg: dict[str, Any], sft_format: str = "deepseek") -> JanusConfig:
    """JanusConfig from a transformers JanusConfig dict."""
    text = cfg.get("text_config") or {}
    vis = cfg.get("vision_config") or {}
    vq = cfg.get("vq_config") or {}
    llm = _llm_from_hf({"vocab_size": 102400, "hidden_size": 2048, **text})
    mult = list(vq.get("channel_multiplier", [1, 1, 2, 2, 4]))
    vision = VisionConfig(image_size=vis.get("image_size", 384), patch_size=vis.get("patch_size", 16),
                          width=vis.get("hidden_size", 1024), layers=vis.get("num_hidden_layers", 24),
                          heads=vis.get("num_attention_heads", 16), mlp_ratio=vis.get("mlp_ratio", 4.0),
                          layer_norm_eps=vis.get("layer_norm_eps", 1e-6), global_pool="")
    vq_cfg = VQConfig(codebook_size=vq.get("num_embeddings", 16384), codebook_embed_dim=vq.get("embed_dim", 8),
                      codebook_show_usage=False, ch=vq.get("base_channels", 128), encoder_ch_mult=mult,
                      decoder_ch_mult=list(mult), z_channels=vq.get("latent_channels", 256),
                      num_res_blocks=vq.get("num_res_blocks", 2), dropout_p=vq.get("dropout", 0.0))
    return JanusConfig(llm=llm, vision=vision, vq=vq_cfg, sft_format=sft_format).validate()


def config_to_hf(config: JanusConfig, image_token_id: int, dtype: str) -> dict[str, Any]:
    """transformers JanusConfig dict (requires what that port can express)."""
    d, v, q = config.llm.hidden_size, config.vision, config.vq
    if q.encoder_ch_mult != q.decoder_ch_mult or config.head_dim != d or not q.codebook_l2_norm:
        raise ConfigError("the transformers layout needs equal encoder/decoder channel multipliers, "
                          "an image head as wide as the LLM and an l2-normalised codebook")
    if v.image_size // v.patch_size != config.gen_grid:
        raise ConfigError("the transformers layout needs the same token grid for understanding and generation")
    text = _llm_to_hf(config.llm)
    return {
        "model_type": "janus",
        "architectures": ["JanusForConditionalGeneration"],
        "dtype": dtype,
        "image_token_id": image_token_id,
        "tie_word_embeddings": config.llm.tie_word_embeddings,
        "text_config": text,
        "vision_config": {
            "model_type": "janus_vision_model", "hidden_size": v.width, "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "mlp_ratio": v.mlp_ratio, "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu",
            "attention_bias": True, "use_qk_norm": False, "projection_dim": d, "depth": 2,
            "num_image_tokens": v.num_patches},
        "vq_config": {
            "model_type": "janus_vqgan", "embed_dim": q.codebook_embed_dim, "num_embeddings": q.codebook_size,
            "latent_channels": q.z_channels, "base_channels": q.ch, "channel_multiplier": q.encoder_ch_mult,
            "num_res_blocks": q.num_res_blocks, "dropout": q.dropout_p, "num_patches": config.gen_grid,
            "projection_dim": d, "num_hidden_layers": 2, "hidden_act": "gelu", "image_token_embed_dim": d},
    }


# ---------------------------------------------------------------- keys

# (openjanus prefix, transformers prefix); `{n}`/`{m}` are layer indices. Most specific first.
_HF_RULES = [
    ("vision_model.vision_tower.patch_embed.proj.", "model.vision_model.embeddings.patch_embedding."),
    ("vision_model.vision_tower.blocks.{n}.norm1.", "model.vision_model.encoder.layers.{n}.layer_norm1."),
    ("vision_model.vision_tower.blocks.{n}.norm2.", "model.vision_model.encoder.layers.{n}.layer_norm2."),
    ("vision_model.vision_tower.blocks.{n}.attn.proj.",
     "model.vision_model.encoder.layers.{n}.self_attn.projection_layer."),
    ("vision_model.vision_tower.blocks.{n}.mlp.", "model.vision_model.encoder.layers.{n}.mlp."),
    ("vision_model.vision_tower.norm.", "model.vision_model.post_layernorm."),
    ("aligner.layers.0.", "model.aligner.fc1."),
    ("aligner.layers.2.", "model.aligner.hidden_layers.0."),
    ("gen_aligner.layers.0.", "model.generation_aligner.fc1."),
    ("gen_aligner.layers.2.", "model.generation_aligner.hidden_layers.0."),
    ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
    ("gen_head.vision_head.", "model.generation_head.vision_head."),
    ("gen_embed.", "model.generation_embeddings."),
    ("gen_vision_model.encoder.conv_blocks.{n}.res.{m}.", "model.vqmodel.encoder.down.{n}.block.{m}."),
    ("gen_vision_model.encoder.conv_blocks.{n}.", "model.vqmodel.encoder.down.{n}."),
    ("gen_vision_model.decoder.conv_blocks.{n}.res.{m}.", "model.vqmodel.decoder.up.{n}.block.{m}."),
    ("gen_vision_model.decoder.conv_blocks.{n}.", "model.vqmodel.decoder.up.{n}."),
    ("gen_vision_model.encoder.mid.0.", "model.vqmodel.encoder.mid.block_1."),
    ("gen_vision_model.encoder.mid.1.", "model.vqmodel.encoder.mid.attn_1."),
    ("gen_vision_model.encoder.mid.2.", "model.vqmodel.encoder.mid.block_2."),
    ("gen_vision_model.decoder.mid.0.", "model.vqmodel.decoder.mid.block_1."),
    ("gen_vision_model.decoder.mid.1.", "model.vqmodel.decoder.mid.attn_1."),
    ("gen_vision_model.decoder.mid.2.", "model.vqmodel.decoder.mid.block_2."),
    ("gen_vision_model.", "model.vqmodel."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
]

_POS_EMBED = ("vision_model.vision_tower.pos_embed", "model.vision_model.embeddings.position_embedding.weight")
_QKV = re.compile(r"vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_QKV_HF = re.compile(r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
# Stored by official checkpoints, not by the transformers port (its converter drops them too).
_NOT_IN_HF = ("vision_model.vision_tower.attn_pool.", "gen_vision_model.quantize.codebook_used")


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{m\}", r"(?P<m>\d+)")
    return re.compile("^" + pattern)


_TO_HF = [(_compile(ours), theirs) for ours, theirs in _HF_RULES]
_FROM_HF = [(_compile(theirs), ours) for ours, theirs in _HF_RULES]


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end():]
    return None


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """openjanus state dict -> transformers janus state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(_NOT_IN_HF):
            continue
        if key == _POS_EMBED[0]:
            out[_POS_EMBED[1]] = tensor[0]
            continue
        qkv = _QKV.match(key)
        if qkv:
            layer, kind = qkv.groups()
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"model.vision_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
            continue
        new = _rename(key, _TO_HF)
        if new is None:
            raise KeyError(f"no transformers name for '{key}'")
        out[new] = tensor
    return out


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers janus state dict -> openjanus state dict (unknown keys kept as they are)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == _POS_EMBED[1]:
            out[_POS_EMBED[0]] = tensor[None]
            continue
        qkv = _QKV_HF.match(key)
        if qkv:
            layer, name, kind = qkv.groups()
            parts.setdefault((layer, kind), {})[name] = tensor
            continue
        out[_rename(key, _FROM_HF) or key] = tensor
    for (layer, kind), qkv_parts in parts.items():
        if set(qkv_parts) != set("qkv"):
            raise KeyError(f"vision layer {layer} lacks some of q/k/v_proj.{kind}")
        out[f"vision_model.vision_tower.blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [qkv_parts[n] for n in "qkv"], dim=0)
    return out


def from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> openjanus (same names; stale rotary buffers dropped)."""
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
