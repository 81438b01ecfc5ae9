"""Pure nn.Modules: no I/O, tokenizers or image files here."""

from .janus import GenHead, JanusModel
from .llm import KVCache, LanguageModel
from .vision import VisionTower
from .vq import VQModel

__all__ = ["GenHead", "JanusModel", "KVCache", "LanguageModel", "VisionTower", "VQModel"]
