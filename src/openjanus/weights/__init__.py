"""Checkpoint reading and writing: official, transformers and openjanus layouts."""

from .io import (
    Checkpoint,
    CheckpointError,
    build_from_state,
    iter_tensors,
    load_checkpoint,
    read_config,
    resolve_dtype,
    save_checkpoint,
)
from .layouts import HF, LAYOUTS, OFFICIAL, OPENJANUS

__all__ = ["HF", "LAYOUTS", "OFFICIAL", "OPENJANUS", "Checkpoint", "CheckpointError", "build_from_state",
           "iter_tensors", "load_checkpoint", "read_config", "resolve_dtype", "save_checkpoint"]
