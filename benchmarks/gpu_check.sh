#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU and slimlm installed with its own torch build (pip install -e ".[dev]"):
# the GPU test tier (pytest -m gpu) and the GPU benchmark (benchmarks/gpu_bench.py), in at most 10 minutes on one
# GPU, writing under $OUT (the benchmark's JSON after each of its sections, so a cut-off run keeps what it measured).
#   bash benchmarks/gpu_check.sh            # OUT=runs/gpu_check by default
#   GPU_BENCH_ARGS="--sections scoring,decode --decode-variants eager,compiled,compiled_dynamic" bash benchmarks/gpu_check.sh
#                                           # the benchmark's other sections / variants (benchmarks/gpu_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU available to torch')"
status=0
timeout 300 "$PY" -m pytest -q -m gpu tests/gpu tests/quantize/test_linear.py --junitxml "$OUT/gpu_tier.xml" 2>&1 \
    | tee "$OUT/gpu_tier.log" || status=$?
# shellcheck disable=SC2086 # GPU_BENCH_ARGS is a list of arguments
timeout 280 "$PY" benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log" || status=$?
echo "gpu_check: exit $status; results in $OUT"
exit $status
