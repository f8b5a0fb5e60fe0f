#!/usr/bin/env bash
# Training-throughput campaign (docs/BENCHMARKS.md, issue: stage kl >= 250k and align >= 400k tokens/s per H200),
# run in the background by `bench/gpu_session.sh start bench/gpu_throughput.sh` after `setup` (which unpacks the
# baseline tree to /tmp/old). Each case is `bench/train_throughput.py one`; records gather in /tmp/res/tp,
# logs in /tmp/res/logs; `bench/gpu_campaign.sh pack` tars them for the trip back.
#
# One chain per GPU (kl on GPU 0, align on GPU 1; the random Llama-3-8B teacher is written first on GPU 1), then the
# 2-GPU cases on both, then stage kl at Llama-3-8B shape under ZeRO-3 on both (WITH_8B_OLD=1: the baseline tree too).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
R=${CAMPAIGN_RES:-/tmp/res}  # (as bench/gpu_campaign.sh's: a THEN= step writes beside its campaign)
TP=$R/tp
CFG=runs/smollm2_throughput.yaml
OLD=/tmp/old
NEW=$PWD
mkdir -p $R/logs $TP
T0=$(cat $R/t0 2>/dev/null || date +%s)
note() { echo "$(date +%T) +$(( $(date +%s) - T0 ))s $*" | tee -a $R/progress.log; }
case1() {  # case1 GPUS NAME TREE STAGE STEPS [overrides...]: one case on the given GPUs (1 or 2)
  local gpus=$1 name=$2 tree=$3 stage=$4 steps=$5; shift 5
  local n; n=$(echo "$gpus" | tr ',' '\n' | wc -l)
  note "start $name (GPU $gpus)"
  local launch=(python3)
  [ "$n" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node "$n")
  (export CUDA_VISIBLE_DEVICES=$gpus; timeout "${CASE_TIMEOUT:-420}" "${launch[@]}" bench/train_throughput.py one \
     --tree "$tree" --name "$name" --stage "$stage" --config "$NEW/$CFG" --steps "$steps" --warmup "${WARMUP:-3}" \
     --profile-steps "${PROFILE_STEPS:-3}" --out "$TP/$name.json" "$@") > $R/logs/$name.log 2>&1
  note "end $name rc=$?"
}

# the new defaults (runs/*.yaml; DS_HYBRID_OPTIMIZER_STEP's default, auto, takes the sync-free step with ZeRO-1)
NEWKL=(kl.ds_config=ds_configs/student_zero1.json kl.micro_batch=auto kl.loss_chunk_tokens=4096 kl.teacher_overlap=true)
NEWAL=(align.ds_config=ds_configs/student_zero1.json align.micro_batch=auto)
S8B=runs/llama3_8b_scaling.yaml
case "${1:-main}" in
  kl_chain)
    case1 0 kl_old_mb8 $OLD kl 44
    case1 0 kl_new_gb16 $NEW kl 44 "${NEWKL[@]}"
    case1 0 kl_new_gb64 $NEW kl 17 "${NEWKL[@]}" kl.global_batch=64
    ;;
  align_chain)
    (export CUDA_VISIBLE_DEVICES=1; python3 bench/random_teacher.py --config runs/configs/llama3_8b/config.json \
       --out /tmp/llama3_8b_random > $R/logs/random_teacher.log 2>&1)
    case1 1 align_old_mb16 $OLD align 17
    case1 1 align_new_gb64 $NEW align 17 "${NEWAL[@]}"
    case1 1 align_new_gb96 $NEW align 17 "${NEWAL[@]}" align.global_batch=96
    ;;
  two_gpu)  # the same global batch (half the rows per GPU) and the same rows per GPU (twice the global batch); the
            # one-GPU rows they are read against: main's kl_new_gb64 and align_new_gb96 of the same lease (its chains
            # run first; explore's rows of those names hold other knobs)
    case1 0,1 kl_new_gb64_2gpu $NEW kl 17 "${NEWKL[@]}" kl.global_batch=64
    case1 0,1 kl_new_gb128_2gpu $NEW kl 17 "${NEWKL[@]}" kl.global_batch=128
    case1 0,1 align_new_gb96_2gpu $NEW align 17 "${NEWAL[@]}" align.global_batch=96
    case1 0,1 align_new_gb192_2gpu $NEW align 17 "${NEWAL[@]}" align.global_batch=192
    ;;
  8b)
    CFG=$S8B CASE_TIMEOUT=480 WARMUP=2 PROFILE_STEPS=1 case1 0,1 kl8b_new_2gpu $NEW kl 6 kl.micro_batch=auto
    ;;
  8b_old)
    CFG=$S8B CASE_TIMEOUT=480 WARMUP=2 PROFILE_STEPS=1 case1 0,1 kl8b_old_2gpu $OLD kl 6
    ;;
  explore)  # one GPU, issue 14's open targets: the defaults against knobs, cheapest first, so that a lease cut short
             # keeps whole cases. `start bench/gpu_throughput.sh` with CAMPAIGN=explore; 9 cases, ~15 minutes (an
             # estimate; + ~8 for `autotune`). Measured so far: a/b GEMM +3.8 % (2026-12-03c), teacher overlap +0.4 %
             # (12-03c) and +1.2 % (12-04e), align's row groups +0.3 % (12-03d), kl's 4096-token chunk +0.6 %
             # (12-03d) and +1.3 % (12-04e), 16-bit logits +2.6 % (12-04e, now the default), max-autotune +2.4 %
             # (12-03b) and +1.0 % (12-03c); 2026-12-05: align's split layout +15.4 % over the one-GEMM layout,
             # sync_free +1.2 % (kl alone) and +1.5 % (with the knobs), +0.0 % on align, kl's chunk 4096 and overlap
             # +2.3 %, max-autotune -0.1 % (the defaults since: split, sync_free via `auto`, chunk 4096 and overlap
             # in runs/*.yaml). The cases: align one-GEMM and split under DeepSpeed's step, split with sync_free;
             # kl's earlier defaults (chunk 1024, no overlap) without and with sync_free, the knobs without and with
             # it; align's row groups; then (`autotune`) kl's defaults with max-autotune. Each case names the values
             # it measures, so the rows keep their meaning whatever the defaults (kl.dw_fp32=false in the kl cases measured
             # before it was the default; the dwfp32 case beside them).
    [ -f $R/t0 ] || date +%s > $R/t0   # (within `session`: one clock for the lease)
    T0=$(cat $R/t0)
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.csv 2>&1
    DS_HYBRID_ALIGN_LAYOUT=one_gemm DS_HYBRID_OPTIMIZER_STEP=deepspeed case1 0 align_onegemm_gb96 $NEW align 17 \
      "${NEWAL[@]}" align.global_batch=96
    DS_HYBRID_OPTIMIZER_STEP=deepspeed case1 0 align_new_gb96 $NEW align 17 "${NEWAL[@]}" align.global_batch=96
    DS_HYBRID_OPTIMIZER_STEP=sync_free case1 0 align_syncfree_gb96 $NEW align 17 "${NEWAL[@]}" align.global_batch=96
    DS_HYBRID_OPTIMIZER_STEP=deepspeed case1 0 kl_new_gb64 $NEW kl 17 "${NEWKL[@]}" kl.global_batch=64 \
      kl.loss_chunk_tokens=1024 kl.teacher_overlap=false kl.dw_fp32=false
    DS_HYBRID_OPTIMIZER_STEP=sync_free case1 0 kl_syncfree_gb64 $NEW kl 17 "${NEWKL[@]}" kl.global_batch=64 \
      kl.loss_chunk_tokens=1024 kl.teacher_overlap=false kl.dw_fp32=false
    DS_HYBRID_OPTIMIZER_STEP=deepspeed case1 0 kl_chunk4096_overlap_gb64 $NEW kl 17 "${NEWKL[@]}" kl.global_batch=64 \
      kl.dw_fp32=false
    DS_HYBRID_OPTIMIZER_STEP=sync_free case1 0 kl_chunk4096_overlap_syncfree_gb64 $NEW kl 17 "${NEWKL[@]}" \
      kl.global_batch=64 kl.dw_fp32=false
    # (kl.dw_fp32, the default since 2026-12-06: dW summed in fp32 over a micro-batch's chunks of 4,096 tokens)
    DS_HYBRID_OPTIMIZER_STEP=sync_free case1 0 kl_chunk4096_overlap_syncfree_dwfp32_gb64 $NEW kl 17 "${NEWKL[@]}" \
      kl.global_batch=64 kl.dw_fp32=true
    DS_HYBRID_ALIGN_PASS_ELEMENTS=2147483647 case1 0 align_rowgroups_gb96 $NEW align 17 "${NEWAL[@]}" \
      align.global_batch=96
    python3 bench/train_throughput.py report $TP/*.json --out $R/train_throughput > $R/report.md 2>&1
    if [ "${EXPLORE_AUTOTUNE:-1}" = 1 ]; then "$0" autotune; fi
    note "explore done"
    [ "${IN_SESSION:-0}" = 1 ] || touch $R/CAMPAIGN_DONE
    ;;
  dwfp32)  # issue 14 on an idle GPU (~4 minutes, an estimate, e.g. after a compare campaign ends): kl's defaults with
           # kl.dw_fp32 off and on, alternated twice (one GPU's drift falls on both), then the tests that skip without
           # a GPU (the bundle's pytest) into $R/cuda_tests.log
    [ -f $R/t0 ] || date +%s > $R/t0
    T0=$(cat $R/t0)
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.csv 2>&1
    fail=0
    for r in 1 2; do
      for dw in false true; do
        n=kl_chunk4096_overlap_syncfree$([ $dw = true ] && echo _dwfp32)_gb64_r$r
        rm -f $TP/$n.json   # (an earlier run's record on this machine would pass for this one's)
        DS_HYBRID_OPTIMIZER_STEP=sync_free case1 0 $n $NEW kl 17 "${NEWKL[@]}" kl.global_batch=64 kl.dw_fp32=$dw
        [ -s $TP/$n.json ] || fail=1   # (a case that wrote no record failed: its log says why)
      done
    done
    python3 bench/train_throughput.py report $TP/kl_chunk4096_overlap_syncfree*_gb64_r?.json --out $R/train_throughput \
      > $R/report.md 2>&1
    note "start cuda_tests"
    TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -p no:cacheprovider -rs \
      tests/test_kernels.py::test_bf16_dw_fp32_sum_on_cuda \
      tests/test_graph_decode.py::test_graph_replay_equals_eager_static_on_cuda > $R/cuda_tests.log 2>&1
    rc=$?
    note "end cuda_tests rc=$rc"
    [ $rc = 0 ] || fail=1
    grep -qE '[0-9]+ skipped' $R/cuda_tests.log && fail=1   # (a test that skipped, e.g. no CUDA seen, tested nothing)
    [ "${IN_SESSION:-0}" = 1 ] || touch $R/CAMPAIGN_DONE
    exit $fail   # (THEN's status in the campaign's progress log)
    ;;
  autotune)  # kl's knobs with max-autotune (~8 minutes with its autotuning on a fresh machine)
    DS_HYBRID_COMPILE_MODE=max-autotune-no-cudagraphs CASE_TIMEOUT=600 \
      case1 0 kl_chunk4096_overlap_maxautotune_gb64 $NEW kl 17 "${NEWKL[@]}" kl.global_batch=64
    python3 bench/train_throughput.py report $TP/*.json --out $R/train_throughput > $R/report.md 2>&1
    ;;
  kl21)  # issue 21 in one run (~7 minutes, an estimate; then issue 14's two default cases, ~2 minutes, unless
         # KL21_DEFAULTS=0): every implementation at every shape, ours with fp32 and 16-bit logits, and with dW's GEMM
         # over 2 and 4 chunks, at chunks 512, 1024 and 2048 (the clause "beats every one at every shape at no more extra memory
         # than the leanest": the chunk that fits under Liger's memory at each shape; the 70B row after the backward
         # that skips its pass over dW where the loss's gradient is 1)
    [ -f $R/t0 ] || date +%s > $R/t0
    T0=$(cat $R/t0)
    note "start kl_bench_all"
    python3 bench/kl.py --shapes all --impls naive,fla,torchtune,liger,ours,ours_bf16,ours_bf16_dw2,ours_bf16_dw4 --chunks 512,1024,2048 \
      --out $R/kl_bench_all.json > $R/logs/kl_bench_all.log 2>&1
    note "end kl_bench_all rc=$?"
    python3 bench/kl.py --report $R/kl_bench_all.json --plot $R/kl_bench_all.png > $R/kl_bench_verdict.md 2>&1  # (issue 21's clause per shape)
    if [ "${KL21_DEFAULTS:-1}" = 1 ]; then  # issue 14: both stages at today's defaults (auto: the sync-free step with
      # torch's fused AdamW since 2026-12-05, measured on the GPU before only with DeepSpeed's foreach one), ~2 minutes
      case1 0 kl_defaults_gb64 $NEW kl 17 "${NEWKL[@]}" kl.global_batch=64
      case1 0 align_defaults_gb96 $NEW align 17 "${NEWAL[@]}" align.global_batch=96
      python3 bench/train_throughput.py report $TP/*.json --out $R/train_throughput > $R/report.md 2>&1
    fi
    [ "${IN_SESSION:-0}" = 1 ] || touch $R/CAMPAIGN_DONE
    ;;
  decode)  # issue 18 after a full setup, in the background (no 10-minute call limit): the exactness check with its
            # fp32/bf16 criteria and the compiled step's tokens (first: short and decisive), then the 8B rows at
            # batch 4 with compiled graphs and fused input projections (FUSE=1: mode cuda_graphs_compiled_fused),
            # then SmolLM2's 32k batch-8 row compiled and fused (2026-12-03d: compiled 8B measured, SmolLM2 b8 plain)
    [ -f $R/t0 ] || date +%s > $R/t0
    T0=$(cat $R/t0)
    (COMPILE=1 CONTEXTS= BATCHES=1,4 OUT=$R/decode bench/gpu_session.sh graphcheck > $R/logs/graphcheck.log 2>&1)
    note "end graphcheck rc=$?"
    if [ "${DECODE_8B:-1}" = 1 ]; then  # (~7 minutes; DECODE_8B=0 leaves them out)
      (CONTEXTS=${CONTEXTS:-4096,32768} BATCHES=${BATCHES:-4} GRAPHS=1 COMPILE=1 FUSE=1 OUT=$R/decode \
        bench/gpu_session.sh infer 8b noprofile > $R/logs/infer8b.log 2>&1); note "end infer 8b rc=$?"
    fi
    (CONTEXTS=32768 BATCHES=8 GRAPHS=1 COMPILE=1 FUSE=1 OUT=$R/decode \
      bench/gpu_session.sh infer small noprofile > $R/logs/infersmall.log 2>&1); note "end infer small rc=$?"
    (CONTEXTS=8192,32768 BATCHES=1,8 GRAPHS=1 COMPILE=1 OUT=$R/decode \
      bench/gpu_session.sh infer gemma noprofile > $R/logs/infergemma.log 2>&1); note "end infer gemma rc=$?"
    [ "${IN_SESSION:-0}" = 1 ] || touch $R/CAMPAIGN_DONE
    ;;
  session)  # one lease, one chain, ~25 minutes (an estimate): issue 14's explore cases (spans, the knobs together),
             # issue 21's Llama-3-70B row at the chunk whose 16-bit logits fit Liger's memory (2048), then issue 18's
             # decode rows not yet run: the Gemma-shaped teacher with rings and without, the 8B fused rows
             # (2026-12-04e ran the graph checks, kl_inplace_check, every kl.py shape and SmolLM2's compiled rows)
    date +%s > $R/t0
    T0=$(cat $R/t0)
    IN_SESSION=1 EXPLORE_AUTOTUNE=0 "$0" explore
    note "start kl_bench"
    python3 bench/kl.py --shapes llama3-70b --impls ours,ours_bf16 --chunks 1024,2048 --out $R/kl_bench.json \
      > $R/logs/kl_bench.log 2>&1
    note "end kl_bench rc=$?"
    "$0" autotune
    (GEMMA_CHECK=0 CONTEXTS=32768 BATCHES=8 GRAPHS=1 COMPILE=1 OUT=$R/decode \
      bench/gpu_session.sh infer gemma noprofile > $R/logs/infergemma.log 2>&1); note "end infer gemma rc=$?"
    (CONTEXTS=4096,32768 BATCHES=4 GRAPHS=1 COMPILE=1 FUSE=1 OUT=$R/decode \
      bench/gpu_session.sh infer 8b noprofile > $R/logs/infer8b.log 2>&1); note "end infer 8b rc=$?"
    note "campaign done"
    touch $R/CAMPAIGN_DONE
    ;;
  main)
    date +%s > $R/t0
    T0=$(cat $R/t0)
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.csv 2>&1
    note "throughput campaign on $(python3 -c 'import torch; print(torch.cuda.device_count())') GPUs"
    "$0" kl_chain > $R/logs/kl_chain.out 2>&1 &
    p1=$!
    "$0" align_chain > $R/logs/align_chain.out 2>&1 &
    p2=$!
    wait $p1 $p2
    "$0" two_gpu > $R/logs/two_gpu.out 2>&1
    "$0" 8b > $R/logs/8b.out 2>&1
    [ -n "${WITH_8B_OLD:-}" ] && "$0" 8b_old > $R/logs/8b_old.out 2>&1
    python3 bench/train_throughput.py report $TP/*.json --out $R/train_throughput > $R/report.md 2>&1
    note "campaign done"
    touch $R/CAMPAIGN_DONE
    ;;
esac
