#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU and slimlm installed with its own torch build (pip install -e ".[dev]"):
# the GPU test tier (pytest -m gpu) and a short GPU benchmark, in at most 10 minutes on one GPU, writing under $OUT.
#   bash benchmarks/gpu_check.sh            # OUT=runs/gpu_check by default
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU available to torch')"
status=0
timeout 360 "$PY" -m pytest -q -m gpu tests/gpu tests/quantize/test_linear.py --junitxml "$OUT/gpu_tier.xml" \
    | tee "$OUT/gpu_tier.log" || status=$?
timeout 200 "$PY" benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" | tee "$OUT/gpu_bench.log" || status=$?
echo "gpu_check: exit $status; results in $OUT"
exit $status
