"""Training recipes as plain data: a YAML file -> dataclasses, every key and type checked before training.

A recipe is an ordered list of stages. Each stage names a task (`vq`, `encoder` or `janus`),
how its model starts (`init`: the previous stage's output, `scratch`, or a checkpoint
directory), which components train, and its data, loss and optimizer sections.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, JanusConfig, get_preset

TASKS = ("vq", "encoder", "janus")
COMPONENTS = ("vision_model", "aligner", "gen_vision_model", "gen_aligner", "gen_head", "gen_embed",
              "language_model")
# What each task may train: the VQ and encoder trainers own one component; Janus never trains the VQ.
TRAINABLE = {"vq": ("gen_vision_model",), "encoder": ("vision_model",),
             "janus": tuple(c for c in COMPONENTS if c != "gen_vision_model")}
MIXTURE_KINDS = ("understanding", "text", "generation")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the LLM's linears


@dataclass
class OptimConfig:
    """AdamW with warmup then a constant or cosine learning rate, and gradient clipping."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to weight matrices only, never to biases or norms
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class RuntimeConfig:
    """Where and how a stage runs; none of it changes the numbers a run produces on one device type."""

    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast; fp32 master weights; under fsdp, blocks gathered in bf16)
    distributed: str = "ddp"  # ddp | fsdp, used when launched with torchrun on more than one process
    threads: int = 0  # torch CPU threads; 0 = torch's default
    log_every: int = 10
    checkpoint_every_steps: int = 1000
    checkpoint_every_minutes: float = 15.0
    checkpoint_format: str = "full"  # full (checkpoint.pt, gathered on rank 0) | sharded (DCP, one shard per process)
    activation_checkpointing: bool = False  # recompute transformer blocks' activations in the backward pass
    progress: bool = True


@dataclass
class TextTowerConfig:
    """The small text transformer the understanding encoder is contrasted against (discarded afterwards)."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    max_length: int = 64
    embed_dim: int = 256


@dataclass
class LoraSection:
    """LoRA adapters (through peft) on the LLM's linear layers; merged into the weights at the end of the stage."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class ModelSection:
    """How a stage's model starts and which components receive gradients."""

    init: str = "previous"  # previous | scratch | path to a checkpoint directory
    train: list[str] = field(default_factory=list)
    gen_embed_init: str = "keep"  # janus: keep | codebook (copy the l2-normalised VQ codebook first)
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)  # encoder only
    lora: LoraSection | None = None  # janus: `language_model` in `train` then means LoRA adapters on a frozen LLM


@dataclass
class DataSection:
    """Training data; which keys matter depends on the task."""

    seed: int = 0
    eval_batches: int = 2  # held-out global batches scored at the end of the stage
    crop_size: int = 0  # vq: random square crops of this side (0 = whole images)
    eval_images: int = 60  # vq: held-out renders for PSNR and the checker (10 per GenEval task)
    ratios: dict[str, float] = field(default_factory=lambda: {"understanding": 1.0, "generation": 1.0})
    understanding: dict[str, float] = field(default_factory=lambda: {"caption": 1.0, "vqa": 1.0})
    # janus text-to-image sources: geneval (all six tasks), one task by name (e.g. single_object), caption
    generation: dict[str, float] = field(default_factory=lambda: {"geneval": 1.0})
    text_style: str = "plain"  # plain | chat
    caption_drop: float = 0.1  # probability that a text-to-image prompt is replaced by pads (guidance)
    files: dict[str, str] = field(default_factory=dict)  # janus: kind -> JSON / JSON Lines file replacing ShapesWorld
    image_root: str = ""  # janus: where relative image paths of `files` start ("" = each file's directory)
    skip_bad: bool = False  # janus: skip (and count) bad records of `files` instead of refusing to start


@dataclass
class AdversarialConfig:
    """LlamaGen's hinge PatchGAN (3 layers, BatchNorm)."""

    enabled: bool = False
    weight: float = 0.5
    start_step: int = 0
    channels: int = 64
    layers: int = 3


@dataclass
class LossSection:
    """Loss options; which keys matter depends on the task."""

    reconstruction: str = "l2"  # vq: l2 | l1
    reconstruction_weight: float = 1.0
    codebook_weight: float = 1.0
    commitment_weight: float = 1.0  # vq: scales the quantiser's commitment loss, which already has beta 0.25
    codebook_restart_every: int = 0  # vq: every N steps, codes unused since the last restart move onto latents
    quantize_start_step: int = 0  # vq: train as a plain autoencoder before this step, then re-seed every code
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    temperature_init: float = 10.0  # encoder: t = exp(t'), t' initialised at log(temperature_init)
    bias_init: float = -10.0  # encoder: b
    kind_weights: dict[str, float] = field(default_factory=dict)  # janus: per-kind token weights (default 1)
    fp32_image_codes: bool = False  # janus: encode generation targets in float32, not under the stage's bf16


@dataclass
class StageConfig:
    """One stage of a recipe."""

    name: str
    task: str
    steps: int
    batch_size: int  # global, across processes and accumulation
    micro_batch_size: int = 0  # per process and forward pass; 0 = the whole per-process batch
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's runtime


@dataclass
class TokenizerConfig:
    """An existing tokenizer.json, or the ShapesWorld tokenizer built at the start of the run."""

    file: str = ""
    vocab_size: int = 0  # when building; 0 = the model's vocabulary size


@dataclass
class RecipeConfig:
    """A whole training recipe."""

    name: str
    stages: list[StageConfig]
    model: dict[str, Any] | str | None = None  # JanusConfig dict or preset name, for `init: scratch`
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def janus_config(self) -> JanusConfig:
        """The architecture for stages that start from scratch."""
        if self.model is None:
            raise ConfigError("a stage starts from scratch but the recipe has no 'model' section")
        try:
            return get_preset(self.model) if isinstance(self.model, str) else JanusConfig.from_dict(self.model)
        except ConfigError as exc:
            raise ConfigError(f"model: {exc}") from None

    def stage_runtime(self, stage: StageConfig) -> RuntimeConfig:
        """The recipe's runtime with the stage's overrides."""
        return dataclasses.replace(self.runtime, **stage.runtime)

    def stage_hash(self, index: int) -> str:
        """Fingerprint of everything that determines stage `index`'s numbers, earlier stages included."""
        parts = [{"model": self.model, "tokenizer": dataclasses.asdict(self.tokenizer)}]
        for stage in self.stages[:index + 1]:
            parts.append(training_fields(stage))
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def stage_names(self) -> list[str]:
        """Names of the stages, in order."""
        return [stage.name for stage in self.stages]


# Keys added after runs existed, left out of the fingerprint at these defaults so that older checkpoints resume.
_LATER_KEYS = {"model": {"lora": None}, "data": {"image_root": ""}, "loss": {"fp32_image_codes": False}}


def training_fields(stage: StageConfig) -> dict[str, Any]:
    """The stage's settings that change its numbers (runtime and logging excluded).

    `data.skip_bad` is left out: a resumed run re-validates its files, so it either finds the
    same records or stops before training.
    """
    data = dataclasses.asdict(stage)
    data.pop("runtime")
    data["data"].pop("skip_bad")
    for section, defaults in _LATER_KEYS.items():
        for key, default in defaults.items():
            if data[section][key] == default:
                del data[section][key]
    return data


# ---------------------------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(tp, value: Any, where: str) -> Any:
    """`value` checked against the annotation `tp`; errors name the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, where)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        return [_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp](value)
    if not ok:
        raise ConfigError(f"config key '{where}' must be {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def parse_section(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys, wrong types and missing required keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key '{f'{where}.{key}' if where else key}'")
    for name, spec in fields.items():
        if name not in data and spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{f'{where}.{name}' if where else name}' is required")
    return cls(**{key: _convert(hints[key], value, f"{where}.{key}" if where else key)
                  for key, value in data.items()})


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_weights(weights: dict[str, float], allowed: tuple[str, ...], where: str) -> None:
    for key, value in weights.items():
        _require(key in allowed, f"unknown config key '{where}.{key}'; expected one of {', '.join(allowed)}")
        _require(value >= 0, f"config key '{where}.{key}' must be >= 0")
    _require(sum(weights.values()) > 0, f"config key '{where}' needs a positive weight")


def _validate_stage(stage: StageConfig, index: int, where: str) -> None:
    from ..data.shapes import GENERATION_PROMPTS, TEXT_STYLES, UNDERSTANDING_TASKS

    _require(stage.task in TASKS, f"{where}.task must be one of {', '.join(TASKS)}, got {stage.task!r}")
    _require(stage.steps > 0, f"{where}.steps must be > 0")
    _require(stage.batch_size > 0, f"{where}.batch_size must be > 0")
    _require(stage.micro_batch_size >= 0, f"{where}.micro_batch_size must be >= 0")
    _require(index > 0 or stage.model.init != "previous",
             f"{where}.model.init is 'previous' but it is the first stage; use 'scratch' or a checkpoint path")
    if stage.model.lora is not None:
        _validate_lora(stage, where)
    allowed = TRAINABLE[stage.task]
    _require(bool(stage.model.train), f"{where}.model.train must list at least one component")
    for component in stage.model.train:
        _require(component in allowed, f"{where}.model.train: '{component}' cannot be trained by a "
                                       f"{stage.task} stage (allowed: {', '.join(allowed)})")
    _require(stage.model.gen_embed_init in ("keep", "codebook"),
             f"{where}.model.gen_embed_init must be keep or codebook")
    optim = stage.optim
    _require(optim.schedule in ("constant", "cosine"), f"{where}.optim.schedule must be constant or cosine")
    _require(len(optim.betas) == 2, f"{where}.optim.betas must hold two numbers")
    _require(optim.lr > 0 and optim.warmup_steps >= 0 and optim.grad_clip >= 0,
             f"{where}.optim: lr must be > 0, warmup_steps and grad_clip >= 0")
    data, loss = stage.data, stage.loss
    _check_weights(data.ratios, MIXTURE_KINDS, f"{where}.data.ratios")
    _check_weights(data.understanding, UNDERSTANDING_TASKS, f"{where}.data.understanding")
    _check_weights(data.generation, GENERATION_PROMPTS, f"{where}.data.generation")
    _require(data.text_style in TEXT_STYLES, f"{where}.data.text_style must be one of {', '.join(TEXT_STYLES)}")
    _require(0.0 <= data.caption_drop <= 1.0, f"{where}.data.caption_drop must be in [0, 1]")
    _require(min(data.crop_size, data.eval_images, data.eval_batches) >= 0,
             f"{where}.data: crop_size, eval_images and eval_batches must be >= 0")
    for kind in data.files:
        _require(kind in MIXTURE_KINDS, f"unknown config key '{where}.data.files.{kind}'; "
                                        f"expected one of {', '.join(MIXTURE_KINDS)}")
    _require(loss.reconstruction in ("l2", "l1"), f"{where}.loss.reconstruction must be l2 or l1")
    _require(loss.temperature_init > 0, f"{where}.loss.temperature_init must be > 0")
    _require(min(loss.codebook_restart_every, loss.quantize_start_step) >= 0,
             f"{where}.loss: codebook_restart_every and quantize_start_step must be >= 0")
    for kind in loss.kind_weights:
        _require(kind in MIXTURE_KINDS, f"unknown config key '{where}.loss.kind_weights.{kind}'")
    for key, value in stage.runtime.items():
        _require(key in {f.name for f in dataclasses.fields(RuntimeConfig)},
                 f"unknown config key '{where}.runtime.{key}'")
        stage.runtime[key] = _convert(typing.get_type_hints(RuntimeConfig)[key], value, f"{where}.runtime.{key}")


def _validate_lora(stage: StageConfig, where: str) -> None:
    lora, key = stage.model.lora, f"{where}.model.lora"
    _require(stage.task == "janus", f"{key}: LoRA is for janus stages only, not {stage.task}")
    _require("language_model" in stage.model.train,
             f"{key} adapts the LLM, so {where}.model.train must list 'language_model'")
    _require(lora.r > 0, f"{key}.r must be > 0")
    _require(lora.alpha > 0, f"{key}.alpha must be > 0")
    _require(0.0 <= lora.dropout < 1.0, f"{key}.dropout must be in [0, 1)")
    _require(bool(lora.target_modules), f"{key}.target_modules must list at least one layer")
    for name in lora.target_modules:
        _require(name in LORA_TARGETS, f"{key}.target_modules: '{name}' is not a linear layer of the LLM "
                                       f"(allowed: {', '.join(LORA_TARGETS)})")


def _validate_runtime(runtime: RuntimeConfig, where: str) -> None:
    _require(runtime.precision in ("fp32", "bf16"), f"{where}.precision must be fp32 or bf16")
    _require(runtime.distributed in ("ddp", "fsdp"), f"{where}.distributed must be ddp or fsdp")
    _require(runtime.device in ("auto", "cpu", "cuda"), f"{where}.device must be auto, cpu or cuda")
    _require(runtime.checkpoint_format in ("full", "sharded"), f"{where}.checkpoint_format must be full or sharded")
    _require(runtime.log_every > 0 and runtime.checkpoint_every_steps > 0,
             f"{where}: log_every and checkpoint_every_steps must be > 0")


def recipe_from_dict(data: Any) -> RecipeConfig:
    """Parse and validate a recipe mapping (as read from YAML)."""
    recipe = parse_section(RecipeConfig, data)
    _require(bool(recipe.stages), "config key 'stages' must list at least one stage")
    names = recipe.stage_names()
    duplicates = sorted({n for n in names if names.count(n) > 1})
    _require(not duplicates, f"stage names must be unique; repeated: {', '.join(duplicates)}")
    _validate_runtime(recipe.runtime, "runtime")
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}] ({stage.name})"
        _validate_stage(stage, index, where)
        _validate_runtime(recipe.stage_runtime(stage), f"{where}.runtime")
        if stage.model.init == "scratch":
            recipe.janus_config()
    return recipe


def load_recipe(path: str | Path) -> RecipeConfig:
    """Read and validate a recipe YAML file; every problem raises ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return recipe_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
