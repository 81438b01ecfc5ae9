"""Training data: ShapesWorld streams generated on the fly, JSON and JSON Lines files, mixtures and token sequences."""

from .files import DataError, DataIndex, JsonlDataset, check_data_file, scan_data_file
from .mixture import Mixture
from .sequences import (
    IGNORE_INDEX,
    KINDS,
    JanusBatch,
    TokenSample,
    collate,
    drop_condition,
    encode_conversation,
    encode_generation,
    encode_text,
)
from .shapes import (
    ConversationExample,
    GenerationExample,
    ShapesCaptions,
    ShapesGeneration,
    ShapesImages,
    ShapesText,
    ShapesUnderstanding,
    TextExample,
    example_rng,
)
from .tokenizer import build_shapes_tokenizer, shapes_corpus

__all__ = [
    "IGNORE_INDEX", "KINDS", "ConversationExample", "DataError", "DataIndex", "GenerationExample", "JanusBatch",
    "JsonlDataset", "Mixture", "ShapesCaptions", "ShapesGeneration", "ShapesImages", "ShapesText",
    "ShapesUnderstanding", "TextExample", "TokenSample", "build_shapes_tokenizer", "check_data_file", "collate",
    "drop_condition", "encode_conversation", "encode_generation", "encode_text", "example_rng", "scan_data_file",
    "shapes_corpus",
]
