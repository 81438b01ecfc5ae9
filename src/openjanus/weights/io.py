"""Reading and writing checkpoint directories safely and without double copies.

Weights are read from safetensors (memory-mapped) or, only when no
safetensors exist, from `.bin` files through `torch.load(weights_only=True)`;
the model is built on the meta device and the tensors are assigned in place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ConfigError, JanusConfig
from ..model import JanusModel
from ..model.kernels import inference_only_layers
from . import layouts


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    """torch dtype from a name or dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model and what the processor needs."""

    model: JanusModel
    config: JanusConfig
    path: Path
    layout: str


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def read_config(path: str | Path) -> tuple[JanusConfig, str]:
    """The model config of a checkpoint directory and its layout."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    raw = _read_json(path / "config.json")
    try:
        layout = layouts.detect_layout(raw)
        if layout == layouts.OPENJANUS:
            return JanusConfig.from_dict(raw.get("model", {})), layout
        processor = path / "processor_config.json"
        sft_format = _read_json(processor).get("sft_format", "deepseek") if processor.exists() else "deepseek"
        if sft_format not in ("deepseek", "deepseek_old"):
            sft_format = "deepseek"
        if layout == layouts.OFFICIAL:
            return layouts.config_from_official(raw, sft_format), layout
        return layouts.config_from_hf(raw, sft_format), layout
    except ConfigError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (path / s).exists()]
            if missing:
                raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
            return [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    raise CheckpointError(f"no weights in {path} (expected model.safetensors, pytorch_model.bin or an *.index.json)")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of every weight file of a checkpoint directory."""
    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        yield key, handle.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from None
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
                raise CheckpointError(f"{file} could not be read safely (weights_only=True): "
                                      f"{str(exc).splitlines()[0]}") from None
            yield from state.items()


def _adapt_config(config: JanusConfig, keys: set[str]) -> None:
    """Drop never-run tensors the checkpoint does not carry instead of calling them missing."""
    if not any(k.startswith("vision_model.vision_tower.attn_pool.") for k in keys):
        config.vision.global_pool = ""
    if "gen_vision_model.quantize.codebook_used" not in keys:
        config.vq.codebook_show_usage = False
    if "language_model.lm_head.weight" not in keys:
        config.llm.tie_word_embeddings = True


def build_from_state(config: JanusConfig, state: dict[str, torch.Tensor], source: str,
                     device=None, dtype: torch.dtype | None = None) -> JanusModel:
    """Build on meta and assign the tensors; one error names every mismatch."""
    _adapt_config(config, set(state))
    with torch.device("meta"):
        model = JanusModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape)
    if missing or unexpected or wrong:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
                problems.append(f"{label}: {shown}")
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))
    for key, tensor in state.items():
        if tensor.is_floating_point() and dtype is not None and tensor.dtype != dtype:
            state[key] = tensor.to(dtype)
        if device is not None:
            state[key] = state[key].to(device)
    if config.llm.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if config.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return model.eval()


def load_checkpoint(path: str | Path, device=None, dtype=None) -> Checkpoint:
    """Load a checkpoint directory in any supported layout."""
    path = Path(path)
    config, layout = read_config(path)
    dtype = resolve_dtype(dtype)
    state = dict(iter_tensors(path))
    if layout == layouts.HF:
        state = layouts.from_hf(state)
    elif layout == layouts.OFFICIAL:
        state = layouts.from_official(state)
    model = build_from_state(config, state, str(path), device=device, dtype=dtype)
    return Checkpoint(model=model, config=config, path=path, layout=layout)


def _dtype_name(model: JanusModel) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def save_checkpoint(model: JanusModel, dst: str | Path, layout: str = layouts.OPENJANUS,
                    tokenizer_file: str | Path | None = None, image_token_id: int | None = None) -> Path:
    """Write `model` to `dst` as safetensors in the given layout, with its tokenizer."""
    if layout not in layouts.LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; use one of {', '.join(layouts.LAYOUTS)}")
    if inference_only := inference_only_layers(model):
        raise ValueError(f"this model holds layers prepared for inference only (packed or quantized, e.g. "
                         f"{inference_only[0]}); save a model loaded with openjanus.weights.load_checkpoint instead")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.llm.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    dtype = _dtype_name(model)
    if layout == layouts.OPENJANUS:
        raw = {"format": layouts.OPENJANUS, "version": 1, "model": config.to_dict()}
    elif layout == layouts.OFFICIAL:
        raw = layouts.config_to_official(config, dtype)
        _write_official_processor(dst, config)
    else:
        if image_token_id is None:
            raise ValueError("the transformers layout needs the image token id")
        raw = layouts.config_to_hf(config, image_token_id, dtype)
        state = layouts.to_hf(state)
    tmp = dst / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(dst / "model.safetensors")  # atomic: never leave a truncated file under the real name
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    if layout != layouts.OFFICIAL:
        (dst / "processor_config.json").write_text(
            json.dumps({"sft_format": config.sft_format, "num_image_tokens": config.vision.num_patches},
                       indent=2) + "\n", encoding="utf-8")
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (dst / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_file, dst / "tokenizer.json")
    return dst


def _write_official_processor(dst: Path, config: JanusConfig) -> None:
    processor = {
        "image_tag": "<image_placeholder>", "image_start_tag": "<begin_of_image>",
        "image_end_tag": "<end_of_image>", "num_image_tokens": config.vision.num_patches,
        "add_special_token": False, "sft_format": config.sft_format, "mask_prompt": True,
        "ignore_id": -100, "processor_class": "VLChatProcessor",
    }
    preprocessor = {
        "image_size": config.vision.image_size, "min_size": 14, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "do_normalize": True,
        "image_processor_type": "VLMImageProcessor", "processor_class": "VLChatProcessor",
    }
    for name, data in (("processor_config.json", processor), ("preprocessor_config.json", preprocessor)):
        (dst / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
