"""Run the speed/memory benchmark (same as `openjanus bench`); see benchmarks/RESULTS.md."""

import argparse
from pathlib import Path

from openjanus.bench import format_table, run

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--size", default="tiny")
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--out", type=Path)
args = parser.parse_args()
print(format_table(run(args.size, args.dtype, repeats=args.repeats, out=args.out)))
