#!/usr/bin/env bash
# What `make demo` runs once its venv is installed (and what the GPU campaign `demo` times):
#   on a machine with a GPU: issue 16's recipe (runs/smollm2_compare.yaml: align 50M tokens at 96 x 512, kl at the
#     paper's 32 x 4096, here 50M tokens of it) with the softmax layers GA-S2 chose for SmolLM2-135M at that budget,
#     then the teacher's and the hybrid's RULER niah_single_1 at 2k tokens (100 prompts each, 95 % intervals);
#   without one: the CPU quickstart (runs/smollm2_quickstart.yaml), then generations side by side.
#
#   PYTHON=.venv/bin/python launchers/demo.sh
#   DEMO_RECIPE=gpu|cpu   which of the two (default: gpu where torch sees a GPU)
#   DEMO_OUT=DIR          where the GPU recipe writes (default outputs/smollm2_demo_gpu)
#   DEMO_KL_TOKENS=N      the GPU recipe's kl budget (default 50,331,648, 384 steps, so that the demo fits in 15
#                         minutes of an H200; the comparison's hybrids get 100,663,296: docs/RESULTS.md section 2)
#   DEMO_CONFIG=YAML      the GPU recipe's config (default runs/smollm2_compare.yaml; CPU dry runs: a tiny copy)
#   DEMO_RECALL_PROMPTS=N prompts per model for the recall score (default 100)
#   DEMO_RECALL_LENGTH=N  the recall prompts' length in tokens (default 2048)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# GA-S2's top 8 of 30 layers with 5.2M-token probes after this align (docs/SELECT.md; the selection:
# docs/data/ga_s2_h200_2026-12-02c/selection.json)
LAYERS="[2,5,8,17,18,20,23,24]"
recipe=${DEMO_RECIPE:-$("$PYTHON" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")}
case "$recipe" in gpu|cpu) ;; *) echo "DEMO_RECIPE=$recipe: use gpu or cpu (or leave it unset)" >&2; exit 2 ;; esac
if [ "$recipe" = gpu ]; then
  out=${DEMO_OUT:-outputs/smollm2_demo_gpu}
  start=$(date +%s)
  PYTHON=$PYTHON launchers/run_local.sh "${DEMO_CONFIG:-runs/smollm2_compare.yaml}" align,kl "out_dir=$out" \
    "softmax_layers=$LAYERS" "kl.tokens=${DEMO_KL_TOKENS:-50331648}"
  trained=$(date +%s)
  "$PYTHON" -m ds_hybrid.demo --run "$out" --recall "${DEMO_RECALL_LENGTH:-2048}" \
    --recall-prompts "${DEMO_RECALL_PROMPTS:-100}"
  end=$(date +%s)
  echo "demo: $(( end - start )) s from the first stage to the recall scores" \
    "(align and kl $(( trained - start )) s, generations and recall $(( end - trained )) s)"
else
  PYTHON=$PYTHON launchers/run_local.sh runs/smollm2_quickstart.yaml align,kl
  "$PYTHON" -m ds_hybrid.demo --run outputs/smollm2_quickstart
fi
