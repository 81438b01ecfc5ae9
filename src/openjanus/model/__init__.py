"""Pure nn.Modules: no I/O, tokenizers or image files here."""

from .janus import GenHead, JanusModel
from .llm import KVCache, LanguageModel
from .quant import QUANTIZATIONS, Int8Linear, quantize_int8
from .vision import VisionTower
from .vq import VQModel

__all__ = ["QUANTIZATIONS", "GenHead", "Int8Linear", "JanusModel", "KVCache", "LanguageModel", "VQModel", "VisionTower",
           "quantize_int8"]
