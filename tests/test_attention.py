"""Attention on the CPU: float32 where bf16 trains (the bf16 flash backward is slow), bf16 for inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openjanus.model.kernels import attention


def _qkv(dtype: torch.dtype, requires_grad: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(2, 4, 37, 16).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def test_training_attention_under_bf16_runs_in_float32():
    q, k, v = _qkv(torch.bfloat16, requires_grad=True)
    reference = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float(),
                                               is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, is_causal=True)
        mixed = attention(q.float(), k.float(), v, is_causal=True)  # the LLM's case: RoPE leaves q, k in float32
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.to(torch.bfloat16))  # bf16 arithmetic would differ in the last bits
    assert torch.equal(mixed.float(), reference)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_inference_attention_keeps_bf16():
    q, k, v = _qkv(torch.bfloat16, requires_grad=False)
    with torch.no_grad():
        assert torch.equal(attention(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
