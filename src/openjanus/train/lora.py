"""LoRA on the LLM through peft: adapters injected in place, trained by the usual loop, merged at export.

`peft.inject_adapter_in_model` swaps the targeted `nn.Linear`s of the LLM for peft's LoRA layers
(the base weight moves to `<name>.base_layer.weight`, the adapters are `<name>.lora_A/B.default`),
so the objective, the optimizer, DDP/FSDP and the exact-resume checkpoints see one module tree as
usual. `merge_lora` folds the adapters into the base weights and puts the plain linears back,
which gives the checkpoint layout of a model trained without LoRA.
"""

from __future__ import annotations

from torch import nn

from ..config import ConfigError
from .config import LoraSection

LORA_MARK = "lora_"  # peft's prefix of adapter parameter names


def add_lora(module: nn.Module, lora: LoraSection) -> nn.Module:
    """Inject trainable LoRA adapters into `module`'s target linears; every other weight of it is frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install 'openjanus[train]' (or pip install peft)") from None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none")
    inject_adapter_in_model(config, module)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(is_lora_parameter(name))
    return module


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter."""
    return any(part.startswith(LORA_MARK) for part in name.split("."))


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of `module` into its base weight and put the plain layer back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent_name, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attribute, child.get_base_layer())
    return module
