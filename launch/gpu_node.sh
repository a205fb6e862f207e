#!/usr/bin/env bash
# Train on one GPU node: one process drives all local GPUs (jax sees them as one mesh).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
. "$REPO/launch/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu_node.sh --config CFG[:TARGET] --workdir DIR [options] [-- EXTRA TRAIN FLAGS]

One process on this node drives all its GPUs (the mesh in the config must match their number).

  --config CFG         config file with target, e.g. configs/qwen2_5_3b.py:8xh100
  --workdir DIR        output folder (local path or gs://)
  --manifest M         stage the files in manifest M (path or gs:// URL) first ...
  --stage-dest D       ... under folder D (default /data)
  --install            run launch/install.sh --cuda12 first (creates .venv with jax[cuda12])
  --gpus LIST          CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all)
  --python PY          interpreter (default: .venv/bin/python, else python3)
  --module MOD         entry module (default stepsearch_jax.train)
  --log FILE           also write the output to FILE (default WORKDIR/logs/train.log for local
                       workdirs, runs/logs/train.log otherwise)
  --dry-run            print the commands instead of running them
  -h, --help           this text

Example:
  launch/gpu_node.sh --config configs/qwen2_5_3b.py:8xh100 --workdir runs/qwen2_5_3b \
      --manifest launch/manifest.json --stage-dest /data
USAGE
}

CONFIG="" WORKDIR="" MANIFEST="" STAGE_DEST=/data INSTALL=0 GPUS="" PY="" MODULE=stepsearch_jax.train
LOG="" DRY_RUN=0 EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --manifest) MANIFEST="$2"; shift 2 ;;
    --stage-dest) STAGE_DEST="$2"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --module) MODULE="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -n "$CONFIG" ] || die "--config is required (see --help)"
[ -n "$WORKDIR" ] || die "--workdir is required (see --help)"
export DRY_RUN
cd "$REPO"

if [ "$INSTALL" = 1 ]; then run bash launch/install.sh --cuda12; fi
PY="${PY:-$(repo_python)}"
if [ -n "$MANIFEST" ]; then
  run "$PY" launch/stage_data.py --manifest "$MANIFEST" --dest "$STAGE_DEST"
fi
if [ -z "$LOG" ]; then
  case "$WORKDIR" in *://*) LOG=runs/logs/train.log ;; *) LOG="$WORKDIR/logs/train.log" ;; esac
fi
ENV=(STEPSEARCH_DISTRIBUTED=0 "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
[ -n "$GPUS" ] && ENV+=("CUDA_VISIBLE_DEVICES=$GPUS")
CMD=(env "${ENV[@]}" "$PY" -m "$MODULE" --config "$CONFIG" --workdir "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})
run mkdir -p "$(dirname "$LOG")"
run_sh "set -o pipefail; $(q "${CMD[@]}") 2>&1 | tee -a $(q "$LOG")"
