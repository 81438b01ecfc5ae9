"""Evaluations: shapes-GenEval and shapes-VQA (exact, offline), and GenEval exports for external scoring."""

from .geneval_export import (
    export_geneval,
    load_metadata,
    prompt_from_metadata,
    score_shapes_export,
    shapes_geneval_metadata,
    shapes_metadata,
    write_metadata,
)
from .shapes_geneval import shapes_geneval
from .shapes_vqa import shapes_vqa

__all__ = ["export_geneval", "load_metadata", "prompt_from_metadata", "score_shapes_export", "shapes_geneval",
           "shapes_geneval_metadata", "shapes_metadata", "shapes_vqa", "write_metadata"]
