"""Seconds for 16 guided images of one prompt (tokens + VQ decode): openjanus eager, compiled, and the port.

The GPU target of the speed issue is stated this way: python benchmarks/images.py --size janus-pro-1b --device cuda
"""

import argparse
from pathlib import Path

from openjanus.bench import format_images_table, run_images

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--size", default="tiny")
parser.add_argument("--device", default="cuda")
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--images", type=int, default=16)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--out", type=Path)
args = parser.parse_args()
print(format_images_table(run_images(args.size, args.device, args.dtype, args.images, args.repeats, args.out)))
