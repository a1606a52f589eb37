#!/usr/bin/env bash
# Every GPU measurement the docs owe, in one run on a CUDA machine (see docs/speed.md and
# docs/distributed.md): the GPU tests, inference speed (throughput, and latency with CUDA
# graphs), and training throughput with peak memory. Tables go to stdout and to $OUT (or
# ./gpu-results) as markdown.
#
#     bash benchmarks/gpu_measurements.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -n 5 | tee "$out/gpu-tests.txt"
python benchmarks/speed.py --device cuda --bf16 --channels-last --compile --batch-size 256 | tee "$out/speed-compile.md"
python benchmarks/speed.py --device cuda --bf16 --channels-last --compile reduce-overhead --batch-size 256 \
    | tee "$out/speed-reduce-overhead.md"
python benchmarks/train_throughput.py --device cuda | tee "$out/train-throughput.md"
