#!/usr/bin/env bash
# docs/RESULTS.md's comparison, as a sequence of short resumable steps (each < 10 minutes on one H100/H200).
# Rerun the same command after any interruption: finished training steps are skipped, a stage resumes from its
# checkpoint; the eval and bench steps run again whole each time.
#
#   launchers/smollm2_paper.sh              # everything, in order
#   launchers/smollm2_paper.sh kl_ga_s2_4   # one step (names below)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CFG=runs/smollm2_paper.yaml
OUT=outputs/smollm2_paper
SEL=$OUT/select
train() { $PY ds_hybrid/train.py --config $CFG "$@"; }
kl_run() {  # kl_run NAME SOFTMAX_LAYERS_SPEC [seed]
  local name=$1 spec=$2 seed=${3:-0}
  train --stage kl "out_dir=$OUT/kl_runs/$name" "kl.init_from=$OUT/align/hf" "softmax_layers=$spec" "seed=$seed"
}
steps=(align)
for m in ga_s2 halving proxy uniform smart mse ppl ar ar_multihop; do steps+=("select_$m"); done
for k in 4 8; do for m in ga_s2 halving proxy uniform smart mse ppl ar ar_multihop; do steps+=("kl_${m}_$k"); done; done
steps+=(kl_linear_0 kl_uniform_15 kl_ga_s2_15 kl_ga_s2_4_seed1 kl_uniform_4_seed1 eval bench)
run_step() {
  case $1 in
    align) train --stage align ;;
    select_ga_s2) train --stage select select.method=ga_s2 ;;
    select_*) train --stage select "select.method=${1#select_}" "select.reference=$SEL/ga_s2/selection.json" ;;
    kl_linear_0) kl_run linear_0 "[]" ;;
    kl_*_seed1) s=${1#kl_}; s=${s%_seed1}; m=${s%_*}; k=${s##*_}
                kl_run "${m}_${k}_seed1" "{selection: $SEL/$m/selection.json, k: $k}" 1 ;;
    kl_*) s=${1#kl_}; m=${s%_*}; k=${s##*_}; kl_run "${m}_$k" "{selection: $SEL/$m/selection.json, k: $k}" ;;
    eval) models=(); for d in $OUT/kl_runs/*/hf; do n=$(basename "$(dirname "$d")"); models+=(--model "$n=$d"); done
          $PY -m ds_hybrid.cli eval --overwrite "${models[@]}" --teacher embedded --suite recall --lengths 2048,4096 \
            --swde tests/fixtures/swde_fixture.jsonl --fda tests/fixtures/fda_fixture.json --limit 50 --out $OUT/eval ;;
    bench) $PY -m ds_hybrid.cli bench-infer --overwrite --model "uniform_8=$OUT/kl_runs/uniform_8/hf" --teacher embedded \
             --contexts 4096,16384,32768 --batches 1,8 --out $OUT/bench_infer ;;
  esac
}
if [ $# -gt 0 ]; then run_step "$1"; else for s in "${steps[@]}"; do echo "== $s"; run_step "$s"; done; fi
