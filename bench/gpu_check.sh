#!/usr/bin/env bash
# GPU checks in one go (what ran on the lent H200, bench/results/*_h200.json): the CPU-vs-CUDA
# update test, the engine tests with the GPU as default backend, and the rollout and update
# benchmarks with JAX and torch both on the GPU. Needs a CUDA jaxlib (`bash launch/install.sh
# --dev --cuda12`) or any Python where `jax.devices('gpu')` works.
#   bash bench/gpu_check.sh [OUTDIR]        (default bench/results/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu}; PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT"; rc=0   # every step runs; the exit status says whether any failed
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# JAX preallocates 75% of GPU memory by default; torch shares the card in the rollout bench.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
"$PY" -c "import jax; print(jax.__version__, jax.devices('gpu'))" 2>/dev/null || { echo "no GPU visible to JAX" >&2; exit 2; }
"$PY" -m pytest -q -rs tests/test_cuda_equivalence.py 2>&1 | tee "$OUT/cuda_equivalence.log" || rc=1
# float32 matmuls default to TF32 on recent GPUs; the engine tests compare with torch at full float32.
JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q tests/test_engine.py 2>&1 | tee "$OUT/engine.log" || rc=1
"$PY" bench/rollout.py --repeats 3 --out "$OUT/rollout.json" 2>&1 | tail -n 2 || rc=1
"$PY" bench/update.py --out "$OUT/update.json" 2>&1 | tail -n 3 || rc=1
exit $rc
