"""Weight-only int8 quantization: int8 weights with one scale per output channel.

Decoding reads every weight once per step, so at small batch it is bound by memory bandwidth
and halving the weight bytes (bf16 -> int8) is what makes it faster. Activations stay in the
model's dtype; only the LLM's linear layers and its two heads are quantized (embeddings, norms,
the vision encoder and the VQ model stay as loaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import replace_linears

QUANTIZATIONS = ("int8",)

# torch's CPU int8 kernel (what gpt-fast uses) segfaults in bf16 unless the input width is a
# multiple of 16, and it only wins while decoding: measured single-threaded on AVX-512 with 1B
# shapes it is 2-4x faster than bf16 F.linear for 1-4 rows, even at 8, and from about 16-32 rows on
# slower than converting the weight and calling the bf16 kernel, which is what larger inputs get.
# Its float32 path is far slower per row (2026-12-05, 2 threads, AMD EPYC, 1B layer shapes: against
# converting the weight, 1 row 2.4x faster, 2 rows 1.6x, 8 rows 2.7x slower; on the shipped model, 4
# guided images of one prompt took twice as long through it), so float32 inputs of more than two
# rows convert the weight instead. (Rounding them to bf16 for the bf16 kernel would be faster still,
# but would no longer compute in float32.)
_KERNEL_MAX_ROWS = {torch.bfloat16: 16, torch.float32: 2}
_KERNEL_WIDTH_MULTIPLE = 16
_ROWS_PER_CHUNK = 4096  # bounds the float32 temporaries while quantizing a large head


def check_quantization(method: str | None) -> str | None:
    """The quantization `method` names (None or "none": no quantization), else a one-line ValueError."""
    if method is None or method == "none":
        return None
    if method in QUANTIZATIONS:
        return method
    raise ValueError(f"unknown quantization {method!r}; choose one of: none, {', '.join(QUANTIZATIONS)}")


class Int8Linear(nn.Module):
    """A linear layer holding int8 weights (out, in) and per-output-channel scales; y = (x @ W^T) * s + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Symmetric round-to-nearest int8 of `linear`'s weight, one scale per output row."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        for start in range(0, linear.out_features, _ROWS_PER_CHUNK):
            rows = weight[start:start + _ROWS_PER_CHUNK].float()
            # The scale is rounded to its stored dtype first, so the int8 codes are fitted to it.
            scales = (rows.abs().amax(dim=1) / 127).clamp(min=1e-12).to(weight.dtype)
            codes = (rows / scales.float()[:, None]).round().clamp(-127, 127)
            module.weight[start:start + _ROWS_PER_CHUNK] = codes.to(torch.int8)
            module.scales[start:start + _ROWS_PER_CHUNK] = scales
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantized(self) -> torch.Tensor:
        """The float32 matrix the int8 codes and scales stand for."""
        return self.weight.float() * self.scales.float()[:, None]

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and 0 < x.shape[0] <= _KERNEL_MAX_ROWS.get(x.dtype, 0)
                and self.in_features % _KERNEL_WIDTH_MULTIPLE == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scales = self.scales.to(x.dtype)
        if self._use_kernel(rows):
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight, scales)
        else:
            out = F.linear(rows, self.weight.to(x.dtype)) * scales
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace nn.Linear modules by Int8Linear in place, one layer at a time; returns `model`.

    For a JanusModel only the LLM (decoder layers and text head) and the image head are
    quantized; for any other module every nn.Linear is. A text head tied to the embeddings is
    left as it is (see `replace_linears`).
    """
    from .janus import JanusModel

    roots = [model.language_model, model.gen_head] if isinstance(model, JanusModel) else None
    return replace_linears(model, Int8Linear.from_linear, roots)


def quantize(model: nn.Module, method: str | None) -> nn.Module:
    """Apply the named weight quantization in place (None: leave the model as it is)."""
    if check_quantization(method) == "int8":
        quantize_int8(model)
    return model
