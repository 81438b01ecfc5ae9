"""openjanus: DeepSeek Janus / Janus-Pro in PyTorch: load, chat, generate, train, evaluate, serve."""

from .config import JanusConfig, get_preset
from .model import JanusModel
from .pipeline import JanusPipeline

__version__ = "0.1.0"
__all__ = ["JanusConfig", "JanusModel", "JanusPipeline", "get_preset", "__version__"]
