"""Linear-layer kernels at decode shapes (1, 2 and 8 rows): how fast each streams its weights on this CPU.

Not a benchmark of openjanus against the port: a measurement to choose kernels with. One layer set of
the janus-pro-1b LLM (q, k, v, o: 2048 x 2048; gate, up: 5632 x 2048; down: 2048 x 5632), repeated
so that the weights (1.8 GB in bf16) are far larger than the caches, run through:

- openjanus's packed bf16 layer (`PackedLinear`, what bf16 inference uses on CPU);
- openjanus's weight-only int8 layer (`Int8Linear`: torch's `_weight_int8pack_mm`);
- two candidates that openjanus does not use, with int8 weights *and* int8 activations (one scale
  per input tensor, computed at every call), which changes the arithmetic: torch's dynamically
  quantized linear (FBGEMM; torch has deprecated the quantized tensors it is built on), and oneDNN's
  `qlinear_pointwise` (what inductor's x86 int8 path calls) behind a few torch ops that quantize
  the input.

GB/s counts the weight bytes each kernel must read (2 per parameter in bf16, 1 in int8) over the time
for the whole set, best of `--repeats`; the machine's read bandwidth is measured in the same run.

    python benchmarks/int8_kernels.py
"""

import argparse
import copy
import time
import warnings

import torch
from torch import nn

from openjanus.bench import read_bandwidth
from openjanus.model.kernels import PackedLinear
from openjanus.model.quant import Int8Linear

LAYER_SHAPES = [(2048, 2048)] * 4 + [(5632, 2048)] * 2 + [(2048, 5632)]  # (out, in)


class OneDnnDynamicInt8(nn.Module):
    """y = x @ W^T with W as int8 (one scale per output row) and x quantized to uint8 per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        weight_only = Int8Linear.from_linear(linear)  # the same int8 codes and scales as openjanus's int8
        self.weight_scales = weight_only.scales.float()
        self.packed = torch.ops.onednn.qlinear_prepack(weight_only.weight, [2, linear.in_features])
        self.zero_points = torch.zeros(linear.out_features, dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = x.min().float().clamp(max=0), x.max().float().clamp(min=0)
        scale = ((high - low) / 255).clamp(min=1e-12)
        zero_point = (-low / scale).round()
        codes = (x.float() / scale + zero_point).round().clamp(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise.tensor(codes, scale, zero_point.long(), self.packed,
                                                         self.weight_scales, self.zero_points, None, 1.0, 0,
                                                         x.dtype, "none", [], "")


def best_seconds(layers: list[nn.Module], inputs: dict[int, torch.Tensor], repeats: int) -> float:
    """Best time of one pass through every layer, after a warm-up pass."""
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        times.append(time.perf_counter() - started)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=6, help="copies of the layer set (default 6: 1.8 GB in bf16)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    # Every kernel starts from the same bf16 weights, so the error column compares like with like.
    bf16 = [nn.Linear(n_in, n_out, bias=False, dtype=torch.bfloat16)
            for _ in range(args.copies) for n_out, n_in in LAYER_SHAPES]
    parameters = sum(linear.weight.numel() for linear in bf16)
    with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated
        warnings.simplefilter("ignore")
        dynamic = [torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(linear).float()), {nn.Linear},
                                                          dtype=torch.qint8)[0] for linear in bf16]
    kernels = {  # name: (layers, input dtype, weight bytes per parameter)
        "packed bf16 (openjanus bf16)": ([PackedLinear(linear) for linear in bf16], torch.bfloat16, 2),
        "weight-only int8 (openjanus int8)": ([Int8Linear.from_linear(linear) for linear in bf16], torch.bfloat16, 1),
        "dynamic int8, FBGEMM (not used)": (dynamic, torch.float32, 1),
        "dynamic int8, oneDNN (not used)": ([OneDnnDynamicInt8(linear) for linear in bf16], torch.bfloat16, 1),
    }
    reference = bf16[0].weight.float()  # the error column: layer 0 on 2 rows against float32 arithmetic
    del bf16
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth:.1f} GB/s; {parameters / 1e6:.0f}M parameters per pass; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| kernel | 1 row | 2 rows | 8 rows | relative error |")
    print("| --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for name, (layers, dtype, width) in kernels.items():
            cells = []
            for rows in (1, 2, 8):
                inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {n_in for _, n_in in LAYER_SHAPES}}
                seconds = best_seconds(layers, inputs, args.repeats)
                gb_s = parameters * width / seconds / 1e9
                cells.append(f"{seconds * 1e3:.1f} ms, {gb_s:.1f} GB/s ({gb_s / bandwidth:.0%})")
            x = torch.randn(2, reference.shape[1]).to(dtype)
            exact = x.float() @ reference.t()
            cells.append(f"{float((layers[0](x).float() - exact).norm() / exact.norm()):.4f}")
            print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
