"""CPU kernel choices: inference-only linear layers, the one helper that swaps them into a model, and
attention that trains in float32 on the CPU.

Decoding multiplies one or two rows by every weight matrix, so its speed is how fast the weights
stream from memory. Stock bf16 `F.linear` on CPU re-lays the weight out for oneDNN on every call
and reaches only about half the read bandwidth; a weight reordered once ("packed") into oneDNN's
blocked layout streams at close to it, with bit-identical results (measured on AVX-512 BF16, 1B
layer shapes: 1.5-2x faster at 1-8 rows; `tests/test_kernels.py` checks the equality).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory mappings (Linux; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/"):
                start, end = (int(part, 16) for part in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def _drop_mapped_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Let the kernel drop the file pages behind a memory-mapped tensor that is no longer needed.

    A checkpoint is loaded memory-mapped; packing reads each weight once, which makes its file
    pages resident, and they would stay counted in this process's memory next to the packed copy
    (about twice the weights at 1B). MADV_DONTNEED on the pages wholly inside the tensor gives them
    back; were they touched again, they would be read from the file again, so nothing is lost.
    """
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mappings):
        return  # not file-backed (converted dtype, another device): freed as usual when dropped
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc = ctypes.CDLL(None)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module],
                    roots: list[nn.Module] | None = None) -> nn.Module:
    """Replace every nn.Linear under `roots` (default: the whole model) by `make(linear)`, in place.

    A linear whose weight is shared with a module that is not a linear (a text head tied to the
    embeddings) is left as it is, so that the shared tensor is not held twice. Layers are replaced
    one at a time, and each old weight is freed (or its file pages dropped, when it is memory-mapped)
    before the next is converted, so that peak memory stays near the size of the result: the
    replaced layers' weights belong to this function and must not be used afterwards.
    """
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    targets = [(parent, name) for root in (roots or [model]) for parent in root.modules()
               for name, child in parent.named_children()
               if type(child) is nn.Linear and id(child.weight) not in shared]
    mappings = _file_mappings()
    for parent, name in targets:
        old = getattr(parent, name)
        setattr(parent, name, make(old))
        _drop_mapped_pages(old.weight, mappings)
    return model


def packing_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether packed bf16 linears can run here: CPU, bf16, and a oneDNN build with bf16 kernels."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """A bf16 linear layer whose weight is stored in oneDNN's blocked layout, for CPU inference.

    The packed tensor has the weight's shape but not its memory layout, so it is kept as a private
    buffer outside the state dict: a model holding these layers cannot be saved (load it again).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()
        # The batch-size hint only tunes the layout; any number of rows runs on the packed weight.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, 2), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def pack_linears(model: nn.Module) -> nn.Module:
    """Swap the bf16 CPU linear layers of `model` for PackedLinear in place (no-op where unsupported)."""
    weight = next((m.weight for m in model.modules() if type(m) is nn.Linear), None)
    if weight is None or not packing_supported(weight.device, weight.dtype):
        return model
    return replace_linears(model, PackedLinear)


def inference_only_layers(model: nn.Module) -> list[str]:
    """Names of the layers in `model` that exist only for inference (packed or quantized)."""
    from .quant import Int8Linear

    return [name for name, m in model.named_modules() if isinstance(m, (PackedLinear, Int8Linear))]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, run in float32 when it trains in bf16 on the CPU.

    torch's CPU flash-attention backward is about 3 times slower in bf16 than in float32 (shapes-tiny
    training shapes, 16 x 4 heads x 140 tokens: 17.5 ms against 5.7 ms, with the float32 forward 0.7 ms
    slower), so attention that gradients flow through runs in float32 there, which is also more exact.
    Inference keeps bf16, whose forward is the faster one.
    """
    low_precision = q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")  # autocast runs it in bf16
    if q.device.type == "cpu" and low_precision and q.requires_grad and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
