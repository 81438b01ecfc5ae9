"""Options and the pipeline loader that the `openjanus` commands and the `openjanus eval` group share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DeviceOption = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available)")]
DtypeOption = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16")]
CompileOption = Annotated[bool, typer.Option("--compile", help="Compile the decode steps (torch.compile; CUDA "
                                             "graphs on a GPU). The first call of each batch shape compiles.")]
JacobiOption = Annotated[int, typer.Option("--jacobi-window", help="Speculative Jacobi decoding: up to this many "
                                           "image tokens per forward pass, same distribution; 0 = off.")]


def load_pipeline(model: Path | None, device: str | None, dtype: str | None, quantization: str | None = None,
                  compile: bool = False):
    """The JanusPipeline for a command's --model/--device/--dtype/--quantization/--compile (imported late:
    torch is slow)."""
    from .pipeline import JanusPipeline

    return JanusPipeline.from_pretrained(model, device=device, dtype=dtype, quantization=quantization,
                                         compile=compile)
