#!/usr/bin/env bash
# Run training on every host of a Cloud TPU VM slice (v5e-16, v5p-32, ...) from a workstation.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
. "$REPO/launch/common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh --tpu NAME --zone ZONE --config CFG[:TARGET] --workdir gs://BUCKET/run
                         [options] [-- EXTRA TRAIN FLAGS]

Runs from your workstation with gcloud. Steps, each on all workers at once
(gcloud compute tpus tpu-vm ssh --worker=all):
  push     tar this checkout (tracked and untracked, not ignored files) and unpack it on every host
  install  bash launch/install.sh --tpu (a .venv with jax[tpu] on every host)
  stage    launch/stage_data.py --manifest M --dest D on every host (skips verified files)
  train    python -m stepsearch_jax.train on every host, detached, STEPSEARCH_DISTRIBUTED=1 so
           each process joins jax.distributed; output in REMOTE_DIR/logs/train.log per host
  logs     copy each worker's log to LOGS_OUT/worker-I.log (gcloud ... scp --worker=I)
  stop     kill the training process recorded in REMOTE_DIR/logs/train.pid on every host
Default steps: push,install,stage,train. `--steps logs` later gathers logs.

  --tpu NAME           TPU VM name                     --zone ZONE    its zone
  --project P          gcloud project (default: gcloud's configured one)
  --config CFG         e.g. configs/qwen2_5_3b.py:v5e-16 (path relative to the repo)
  --workdir DIR        gs://BUCKET/runs/NAME (shared by all hosts; a local path is per host)
  --manifest M         staging manifest: gs:// URL, or a local file (copied to every host)
  --stage-dest D       staging root on each host (default /data)
  --steps LIST         comma-separated subset of push,install,stage,train,logs,stop
  --remote-dir DIR     checkout folder on the hosts (default stepsearch_jax, under $HOME)
  --num-workers N      hosts in the slice, for `logs` (default: asked from gcloud describe)
  --logs-out DIR       where `logs` puts worker logs (default runs/logs/TPU_NAME)
  --foreground         train attached: stream every worker's output here, Ctrl-C stops it
  --dry-run            print the gcloud commands instead of running them
  -h, --help           this text

Example:
  launch/tpu_pod.sh --tpu my-v5e-16 --zone us-west4-a --config configs/qwen2_5_3b.py:v5e-16 \
      --workdir gs://my-bucket/runs/qwen2_5_3b --manifest gs://my-bucket/manifest.json
  launch/tpu_pod.sh --tpu my-v5e-16 --zone us-west4-a --steps logs
USAGE
}

TPU="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" MANIFEST="" STAGE_DEST=/data
STEPS=push,install,stage,train REMOTE_DIR=stepsearch_jax NUM_WORKERS="" LOGS_OUT="" FG=0
DRY_RUN=0 EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --manifest) MANIFEST="$2"; shift 2 ;;
    --stage-dest) STAGE_DEST="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --remote-dir) REMOTE_DIR="$2"; shift 2 ;;
    --num-workers) NUM_WORKERS="$2"; shift 2 ;;
    --logs-out) LOGS_OUT="$2"; shift 2 ;;
    --foreground) FG=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
export DRY_RUN
[ -n "$TPU" ] || die "--tpu is required (see --help)"
[ -n "$ZONE" ] || die "--zone is required (see --help)"
for s in ${STEPS//,/ }; do
  case "$s" in push|install|stage|train|logs|stop) ;; *) die "unknown step '$s' in --steps" ;; esac
done
has_step() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
if has_step train; then
  [ -n "$CONFIG" ] || die "--config is required for the train step"
  [ -n "$WORKDIR" ] || die "--workdir is required for the train step"
  [ -f "$REPO/${CONFIG%%:*}" ] || die "config file ${CONFIG%%:*} not found in $REPO"
fi
if has_step stage; then [ -n "$MANIFEST" ] || die "--manifest is required for the stage step"; fi
GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[ -n "$PROJECT" ] && LOC+=(--project="$PROJECT")

on_all() {  # run one shell line on every worker
  run "${GC[@]}" ssh "$TPU" "${LOC[@]}" --worker=all --command="$1"
}
IN_DIR="cd $REMOTE_DIR"

if has_step push; then
  TGZ="$(mktemp -u /tmp/stepsearch_jax-src.XXXXXX).tgz"
  run_sh "cd $(q "$REPO") && git ls-files -z -co --exclude-standard | tar --null -czf $(q "$TGZ") -T -"
  run "${GC[@]}" scp "$TGZ" "$TPU:/tmp/stepsearch_jax-src.tgz" "${LOC[@]}" --worker=all
  on_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/stepsearch_jax-src.tgz -C $REMOTE_DIR"
  run rm -f "$TGZ"
fi
if has_step install; then
  on_all "$IN_DIR && bash launch/install.sh --tpu"
fi
if has_step stage; then
  REMOTE_MANIFEST="$MANIFEST"
  case "$MANIFEST" in
    gs://*) ;;
    *) [ "$DRY_RUN" = 1 ] || [ -f "$MANIFEST" ] || die "manifest $MANIFEST not found"
       run "${GC[@]}" scp "$MANIFEST" "$TPU:/tmp/stepsearch_manifest.json" "${LOC[@]}" --worker=all
       REMOTE_MANIFEST=/tmp/stepsearch_manifest.json ;;
  esac
  on_all "$IN_DIR && sudo mkdir -p $(q "$STAGE_DEST") && sudo chown \$(id -u) $(q "$STAGE_DEST") && .venv/bin/python launch/stage_data.py --manifest $(q "$REMOTE_MANIFEST") --dest $(q "$STAGE_DEST")"
fi
if has_step train; then
  TRAIN="env STEPSEARCH_DISTRIBUTED=1 .venv/bin/python -m stepsearch_jax.train $(q --config "$CONFIG" --workdir "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"})"
  if [ "$FG" = 1 ]; then
    on_all "$IN_DIR && mkdir -p logs && set -o pipefail && $TRAIN 2>&1 | tee logs/train.log"
  else
    on_all "$IN_DIR && mkdir -p logs && (nohup $TRAIN > logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid) && echo \"\$(hostname): started pid \$(cat logs/train.pid)\""
  fi
fi
if has_step logs; then
  if [ -z "$NUM_WORKERS" ]; then
    if [ "$DRY_RUN" = 1 ]; then
      run "${GC[@]}" describe "$TPU" "${LOC[@]}" "--format=value(networkEndpoints[].ipAddress)"
      NUM_WORKERS=1; echo "# dry run: assuming 1 worker (pass --num-workers N)"
    else
      IPS="$("${GC[@]}" describe "$TPU" "${LOC[@]}" "--format=value(networkEndpoints[].ipAddress)")"
      NUM_WORKERS=$(echo "$IPS" | tr ';,' '\n\n' | grep -c .)
    fi
  fi
  OUT="${LOGS_OUT:-runs/logs/$TPU}"
  run mkdir -p "$OUT"
  for ((i = 0; i < NUM_WORKERS; i++)); do
    run "${GC[@]}" scp "$TPU:$REMOTE_DIR/logs/train.log" "$OUT/worker-$i.log" "${LOC[@]}" --worker="$i"
  done
  [ "$DRY_RUN" = 1 ] || echo "tpu_pod.sh: $NUM_WORKERS worker logs in $OUT"
fi
if has_step stop; then
  on_all "$IN_DIR && if [ -f logs/train.pid ]; then kill \$(cat logs/train.pid) && echo \"\$(hostname): stopped\"; fi"
fi
