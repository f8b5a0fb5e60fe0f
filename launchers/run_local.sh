#!/usr/bin/env bash
# Run stages of a conversion on this machine: every GPU it has (one rank each), or one CPU process.
#
#   launchers/run_local.sh runs/smollm2_quickstart.yaml                 # align, kl
#   launchers/run_local.sh runs/x.yaml align,select,kl,finetune kl.tokens=2e8
#   NPROC=2 DS_ACCELERATOR=cpu launchers/run_local.sh runs/x.yaml      # 2 CPU ranks (gloo)
#
# A stage that finished (its DONE marker) is skipped; an interrupted one resumes from its last checkpoint, so the
# same command continues a run after any failure. Logs: <out_dir>/<stage>/launch.log.
set -euo pipefail
CONFIG=${1:?usage: run_local.sh CONFIG [STAGES] [key=value ...]}
STAGES=${2:-align,kl}
shift $(( $# >= 2 ? 2 : 1 ))
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for stage in ${STAGES//,/ }; do  # every stage name checked before the first one runs
  case "$stage" in align|select|kl|finetune) ;;
    *) echo "ds-hybrid: error: STAGES='$STAGES': no stage '$stage'; use align, select, kl, finetune (comma-separated)" >&2
       exit 2 ;;
  esac
done
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
elif ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "ds-hybrid: error: NPROC='$NPROC': the number of ranks on this machine, 1 or more (unset: one per GPU)" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export TOKENIZERS_PARALLELISM=false
# every stage still to run checked before the first starts (ds_hybrid/launch.py: batch vs ranks, budgets, DeepSpeed
# JSONs, select's probes, kl reading the selection select writes); its first line is the run's out_dir
CHECKED=$(KNOWN_STAGES=align,select,kl,finetune LAUNCH_RANKS=$NPROC ERROR_PREFIX="ds-hybrid: error: " \
          SELECT_ARRAY=0 STAGES_DEFAULT=0 EVAL_ARGS= \
          "$PYTHON" -m ds_hybrid.launch "$CONFIG" "$STAGES" "$@") || exit 2
OUT_DIR=${CHECKED%%$'\n'*}
for stage in ${STAGES//,/ }; do
  mkdir -p "$OUT_DIR/$stage"
  echo "== stage $stage ($NPROC rank(s)) -> $OUT_DIR/$stage"
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    "$ROOT/ds_hybrid/train.py" --stage "$stage" --config "$CONFIG" "$@" 2>&1 | tee -a "$OUT_DIR/$stage/launch.log"
done
