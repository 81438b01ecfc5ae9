#!/usr/bin/env bash
# The speed issue's GPU checks in one run on a GPU machine (results: benchmarks/RESULTS.md):
# 16 guided 384 px images at the janus-pro-1b size against the transformers port, then the GPU tests
# (parity with the port on CUDA; CUDA graphs, Jacobi and int8 against eager), then the same images at
# the janus-pro-7b size (one timed run each: its random weights alone take minutes to write).
# Uses the machine's own torch and transformers with this checkout on PYTHONPATH; logs go to $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/machine.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$OUT/machine.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/images.py --size janus-pro-1b --device cuda --repeats 2 \
    --out "$OUT/images-janus-pro-1b.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/images.log"
timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log"
timeout "${BENCH_7B_TIMEOUT:-420}" python3 benchmarks/images.py --size janus-pro-7b --device cuda --repeats 1 \
    --out "$OUT/images-janus-pro-7b.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/images-7b.log"
