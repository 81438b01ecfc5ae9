"""Run the speed/memory benchmark (same as `openjanus bench`); see benchmarks/RESULTS.md."""

import argparse
from pathlib import Path

from openjanus.bench import format_table, run
from openjanus.model.quant import check_quantization

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--size", default="tiny")
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--out", type=Path)
parser.add_argument("--quantization", default="int8", help="also time openjanus quantized: int8 or none")
parser.add_argument("--compile", action="store_true", help="also time openjanus with its compiled decode steps")
args = parser.parse_args()
extra = check_quantization(args.quantization)
print(format_table(run(args.size, args.dtype, repeats=args.repeats, out=args.out,
                       quantizations=(extra,) if extra else (), compile=args.compile)))
