#!/usr/bin/env bash
# Train on several GPU nodes: one process per node, joined by jax.distributed.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
. "$REPO/launch/common.sh"

usage() {
  cat <<'USAGE'
Usage (on each node):  launch/gpu_multinode.sh --coordinator HOST:PORT --num-processes N
                           --process-id I --config CFG[:TARGET] --workdir DIR [options] [-- EXTRA]
Usage (fan out by ssh): launch/gpu_multinode.sh --hosts node0,node1,... [--port P]
                           --config CFG[:TARGET] --workdir DIR [options] [-- EXTRA]

One process per node drives all of that node's GPUs; process 0's host is the coordinator. The
settings become JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
stepsearch_jax.distributed.maybe_initialize() reads at the top of train. Unset flags fall back
to those variables, then to SLURM (SLURM_NTASKS, SLURM_PROCID, first host of SLURM_JOB_NODELIST
with --port), so under SLURM `srun --ntasks-per-node=1 launch/gpu_multinode.sh --config ...
--workdir ...` needs nothing else.

  --coordinator H:P    address of process 0 (reachable from every node)
  --num-processes N    number of nodes (processes)
  --process-id I       this node's index, 0..N-1
  --hosts LIST         instead: ssh into each host (same checkout path on all) and start
                       process i on host i; logs come back to LOGDIR/HOST.log here
  --port P             coordinator port for --hosts / SLURM (default 12355)
  --manifest M         stage manifest M (path or gs:// URL) on this node first ...
  --stage-dest D       ... under D (default /data)
  --install            run launch/install.sh --cuda12 first
  --python PY          interpreter (default: .venv/bin/python, else python3)
  --module MOD         entry module (default stepsearch_jax.train; stepsearch_jax.distributed
                       checks the wiring without training)
  --logdir DIR         per-process logs (default: runs/logs)
  --dry-run            print the commands instead of running them
  -h, --help           this text

Example (2 nodes with 8 H100s each, config target 16xh100):
  node0$ launch/gpu_multinode.sh --coordinator node0:12355 --num-processes 2 --process-id 0 \
             --config configs/qwen2_5_7b.py:16xh100 --workdir /shared/runs/qwen2_5_7b
  node1$ launch/gpu_multinode.sh --coordinator node0:12355 --num-processes 2 --process-id 1 \
             --config configs/qwen2_5_7b.py:16xh100 --workdir /shared/runs/qwen2_5_7b
USAGE
}

COORD="" NPROC="" PID_="" HOSTS="" PORT=12355 CONFIG="" WORKDIR="" MANIFEST="" STAGE_DEST=/data
INSTALL=0 PY="" MODULE=stepsearch_jax.train LOGDIR=runs/logs DRY_RUN=0 EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) COORD="$2"; shift 2 ;;
    --num-processes) NPROC="$2"; shift 2 ;;
    --process-id) PID_="$2"; shift 2 ;;
    --hosts) HOSTS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --manifest) MANIFEST="$2"; shift 2 ;;
    --stage-dest) STAGE_DEST="$2"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --python) PY="$2"; shift 2 ;;
    --module) MODULE="$2"; shift 2 ;;
    --logdir) LOGDIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
export DRY_RUN
if [ "$MODULE" = stepsearch_jax.train ]; then
  [ -n "$CONFIG" ] || die "--config is required (see --help)"
  [ -n "$WORKDIR" ] || die "--workdir is required (see --help)"
fi
cd "$REPO"

# Options every process gets (everything except the process identity).
PASS=()
[ -n "$CONFIG" ] && PASS+=(--config "$CONFIG")
[ -n "$WORKDIR" ] && PASS+=(--workdir "$WORKDIR")
[ -n "$MANIFEST" ] && PASS+=(--manifest "$MANIFEST" --stage-dest "$STAGE_DEST")
[ "$INSTALL" = 1 ] && PASS+=(--install)
[ -n "$PY" ] && PASS+=(--python "$PY")
PASS+=(--module "$MODULE" --logdir "$LOGDIR")

if [ -n "$HOSTS" ]; then   # fan out: process i on host i, coordinator on the first host
  IFS=, read -r -a HOST_LIST <<< "$HOSTS"
  N=${#HOST_LIST[@]}
  run mkdir -p "$LOGDIR"
  PIDS=()
  for ((i = 0; i < N; i++)); do
    h="${HOST_LIST[$i]}"
    REMOTE="cd $(q "$REPO") && launch/gpu_multinode.sh $(q --coordinator "${HOST_LIST[0]}:$PORT" \
      --num-processes "$N" --process-id "$i" "${PASS[@]}" -- ${EXTRA[@]+"${EXTRA[@]}"})"
    if [ "$DRY_RUN" = 1 ]; then
      echo "+ $(q ssh -o BatchMode=yes "$h" "$REMOTE") > $(q "$LOGDIR/$h.log") 2>&1 &"
    else
      ssh -o BatchMode=yes "$h" "$REMOTE" > "$LOGDIR/$h.log" 2>&1 &
      PIDS+=($!)
    fi
  done
  if [ "$DRY_RUN" = 1 ]; then echo "+ wait"; exit 0; fi
  echo "gpu_multinode.sh: started $N processes; logs in $LOGDIR/<host>.log; waiting"
  FAILED=0
  for ((i = 0; i < N; i++)); do
    if ! wait "${PIDS[$i]}"; then
      echo "gpu_multinode.sh: process $i on ${HOST_LIST[$i]} failed; see $LOGDIR/${HOST_LIST[$i]}.log" >&2
      FAILED=1
    fi
  done
  exit "$FAILED"
fi

# One process on this node.
if [ -z "$NPROC" ]; then NPROC="${JAX_NUM_PROCESSES:-${SLURM_NTASKS:-}}"; fi
if [ -z "$PID_" ]; then PID_="${JAX_PROCESS_ID:-${SLURM_PROCID:-}}"; fi
if [ -z "$COORD" ]; then COORD="${JAX_COORDINATOR_ADDRESS:-}"; fi
if [ -z "$COORD" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  COORD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$PORT"
fi
[ -n "$COORD" ] || die "no coordinator: give --coordinator HOST:PORT or set JAX_COORDINATOR_ADDRESS"
[ -n "$NPROC" ] || die "no process count: give --num-processes or set JAX_NUM_PROCESSES"
[ -n "$PID_" ] || die "no process id: give --process-id or set JAX_PROCESS_ID"
[[ "$NPROC" =~ ^[0-9]+$ && "$PID_" =~ ^[0-9]+$ ]] || die "process count/id must be integers"
[ "$PID_" -lt "$NPROC" ] || die "--process-id $PID_ must be < --num-processes $NPROC"

if [ "$INSTALL" = 1 ]; then run bash launch/install.sh --cuda12; fi
PY="${PY:-$(repo_python)}"
if [ -n "$MANIFEST" ]; then
  run "$PY" launch/stage_data.py --manifest "$MANIFEST" --dest "$STAGE_DEST"
fi
ENV=("JAX_COORDINATOR_ADDRESS=$COORD" "JAX_NUM_PROCESSES=$NPROC" "JAX_PROCESS_ID=$PID_"
     "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
CMD=(env "${ENV[@]}" "$PY" -m "$MODULE")
[ -n "$CONFIG" ] && CMD+=(--config "$CONFIG")
[ -n "$WORKDIR" ] && CMD+=(--workdir "$WORKDIR")
CMD+=(${EXTRA[@]+"${EXTRA[@]}"})
LOG="$LOGDIR/train-proc$PID_.log"
run mkdir -p "$LOGDIR"
run_sh "set -o pipefail; $(q "${CMD[@]}") 2>&1 | tee $(q "$LOG")"
