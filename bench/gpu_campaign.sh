#!/usr/bin/env bash
# The 2-GPU campaign behind docs/SELECT.md, docs/RESULTS.md (GPU sections) and docs/SCALE.md (measured), run in the
# background by `bench/gpu_session.sh start` after `setup`. Results (logs, metrics, run_info, selections, eval
# tables) gather in /tmp/res; `pack` tars them for the trip back.
#
# Phase 1, SmolLM2-135M (runs/smollm2_gpu_select.yaml), one chain per GPU:
#   GPU0: align -> kl (1/4 uniform) -> bench-infer -> eval (teacher vs all-linear vs 1/4)
#   GPU1: random Llama-3-8B teacher, 8B-shaped kernel warm-up -> GA-S2 (30 probes + all-linear baseline) -> proxy
#         -> baselines (mse ppl uniform smart ar ar_multihop) -> successive halving
# Phase 2, Llama-3-8B shape, stage kl under ZeRO-3 (runs/llama3_8b_scaling.yaml), both GPUs to itself:
#   2 GPUs and 1 GPU with lr_rest=0 (mixers + softmax attention train: fits 80 GB cards), then 2 GPUs with every
#   parameter trained (the recipe) where the card has room (H200).
# Phase 2 starts when phase 1 ends or at PHASE2_AT seconds, whichever is first (unfinished chains are stopped).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
R=/tmp/res
CFG=runs/smollm2_gpu_select.yaml
SCALE=runs/llama3_8b_scaling.yaml
RUN=/tmp/run/smollm2
TEACHER8B=/tmp/llama3_8b_random
mkdir -p $R/logs
T0=$(cat $R/t0 2>/dev/null || date +%s)
note() { echo "$(date +%T) +$(( $(date +%s) - T0 ))s $*" | tee -a $R/progress.log; }
job() {  # job NAME GPUS CMD...: one logged step
  local name=$1 gpus=$2; shift 2
  note "start $name (GPU $gpus)"
  (export CUDA_VISIBLE_DEVICES=$gpus; "$@") > $R/logs/$name.log 2>&1
  local rc=$?
  note "end $name rc=$rc"
  return $rc
}
wait_for() {  # wait_for FILE...: until every file exists
  for f in "$@"; do while [ ! -e "$f" ]; do sleep 3; done; done
}
train() { python3 ds_hybrid/train.py "$@"; }
select_() { python3 ds_hybrid/train.py --stage select --config $CFG "$@"; }

case "${1:-main}" in
  chain0)
    job align 0 train --stage align --config $CFG || exit 1
    touch $R/align.ok
    job kl 0 train --stage kl --config $CFG || exit 1
    job bench_infer 0 python3 -m ds_hybrid.cli bench-infer --model hybrid_1_4=$RUN/kl/hf \
      --model all_linear=$RUN/align/hf --teacher embedded --contexts 4096,16384,32768 --batches 1,8 \
      --decode-tokens 64 --out $R/bench_infer
    job eval 0 python3 -m ds_hybrid.cli eval --model all_linear=$RUN/align/hf --model hybrid_1_4=$RUN/kl/hf \
      --teacher embedded --suite recall --lengths 2048,4096 --swde tests/fixtures/swde_fixture.jsonl \
      --fda tests/fixtures/fda_fixture.json --limit 16 --batch-size 16 --heldout-sequences 32 --out $R/eval
    ;;
  chain1)
    job random_teacher 1 python3 bench/random_teacher.py --config runs/configs/llama3_8b/config.json --out $TEACHER8B
    job warm_8b 1 python3 bench/warmup_kernels.py --hidden 4096 --heads 32 --head-dim 128 --seq 4096 --vocab 128256
    wait_for $R/align.ok
    job ga_s2 1 select_
    for m in proxy mse ppl uniform smart ar ar_multihop halving; do job "select_$m" 1 select_ select.method=$m; done
    ;;
  phase2)
    wait_for $TEACHER8B/model.safetensors.index.json
    gib=$(python3 -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))")
    kl8b() { python3 -m torch.distributed.run --standalone --nproc_per_node "$1" ds_hybrid/train.py --stage kl \
               --config $SCALE "${@:2}"; }
    job scale_2gpu_lr_rest0 0,1 kl8b 2 out_dir=/tmp/run/s8b_2gpu_lr_rest0 kl.lr_rest=0
    job scale_1gpu_lr_rest0 0 kl8b 1 out_dir=/tmp/run/s8b_1gpu_lr_rest0 kl.lr_rest=0
    if [ "$gib" -ge 120 ]; then job scale_2gpu_all 0,1 kl8b 2 out_dir=/tmp/run/s8b_2gpu_all; fi
    ;;
  main)
    date +%s > $R/t0
    T0=$(cat $R/t0)
    PHASE2_AT=${PHASE2_AT:-780}
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.csv 2>&1
    python3 -c "import torch, triton, deepspeed, fla, transformers, lm_eval
print(dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, deepspeed=deepspeed.__version__,
           fla=fla.__version__, transformers=transformers.__version__, lm_eval=lm_eval.__version__))" > $R/versions.txt 2>&1
    note "campaign starts; phase 2 at the latest at +${PHASE2_AT}s"
    pids=()
    for c in 0 1; do setsid "$0" chain$c > $R/logs/chain$c.out 2>&1 < /dev/null & pids+=($!); done
    while :; do
      alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      if [ $(( $(date +%s) - T0 )) -ge "$PHASE2_AT" ]; then
        note "phase-1 time is up: stopping what still runs"
        for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null; done
        sleep 5; break
      fi
      sleep 5
    done
    note "phase 1 over"
    "$0" phase2
    note "campaign done"
    touch $R/CAMPAIGN_DONE
    ;;
  pack)
    out=${2:-/tmp/out}
    mkdir -p "$out"
    (cd /tmp/run 2>/dev/null && find . \( -name hf -o -name checkpoints \) -prune -o -type f \
       \( -name metrics.jsonl -o -name run_info.json -o -name DONE -o -name 'selection.*' -o -name config.yaml \) \
       -print) > /tmp/res/run_files.txt 2>/dev/null || true
    tar -czf "$out/results.tar.gz" -C /tmp res $(sed 's#^\./#run/#' /tmp/res/run_files.txt) 2>/dev/null || \
      tar -czf "$out/results.tar.gz" -C /tmp res
    ls -la "$out"
    ;;
esac
