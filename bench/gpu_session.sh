#!/usr/bin/env bash
# Steps of a GPU lease on a machine with no network (what came out: docs/BENCHMARKS.md, docs/SCALE.md, docs/SELECT.md,
# docs/RESULTS.md). Everything missing there travels as one tar (bench/make_bundle.sh: wheels, triton 3.7.1, the
# SmolLM2 GGUF, the corpus, optionally a baseline tree) split into .dev/p0 .. .dev/pN, one part per call, the calls
# within the machine's 30 s warm window:
#
#   bench/gpu_session.sh part N           # copy .dev/pN to /tmp/parts
#   bench/gpu_session.sh gpart N          # (issue 17) copy .dev/gN, Gemma-3-270M's wheels, to /tmp/gparts
#   bench/gpu_session.sh apart N          # copy .dev/aN (an earlier lease's align, packed) to /tmp/carry_in: then
#                                         # ALIGN_PARTS=/tmp/carry_in skips align (campaigns compare, ga_s2, gemma)
#   bench/gpu_session.sh setup            # join, install (wheels -> /tmp/site, triton -> /tmp/tsite), corpus, teacher
#   [CAMPAIGN=step] bench/gpu_session.sh start [SCRIPT]   # bench/gpu_campaign.sh (or SCRIPT, e.g. bench/gpu_throughput.sh) in the
#                                         # background (survives the call); DEADLINE_S=N: the device seconds left at this
#                                         # call (the last reply's budget_left_s, or less where the lease `counts`
#                                         # only part of its held time) less a minute: no kl starts that
#                                         # would end with its evaluation past it (refused beside a running campaign)
#   bench/gpu_session.sh sh 'CMD'         # after setup: CMD in the campaigns' environment (e.g. one train_throughput
#                                         # case by hand, `CUDA_LAUNCH_BLOCKING=1 python3 bench/train_throughput.py ...`)
#   OUT=$OUT bench/gpu_session.sh gputests   # after setup: the GPU-only tests, kernels compiled (TRITON_INTERPRET=0;
#                                         # GPUTESTS="FILE -k EXPR": a subset, GPUTESTS_S: its time limit)
#   OUT=$OUT bench/gpu_session.sh wait S  # follow it for up to S seconds; results tarball to $OUT either way, and
#                                         # the parts of the lease's align folder (/tmp/carry_out) not yet sent that
#                                         # fit; returns at once when the campaign process has ended, and with rc 3
#                                         # on a machine where no campaign was started (a lost lease's fresh one)
#   (HERE, after the lease: `bench/import_lease.py FILES_AT/results.tar.gz docs/data/NAME [--merge MERGED]` lays the
#   last tarball out as a docs/data folder, prints each hybrid's training summary and recall, and merges its evals;
#   [APREFIX=.dev/s1a] bench/gpu_session.sh gather FILES_AT... puts the align's parts the polls brought home into .dev/a0..a3)
#   OUT=$OUT bench/gpu_session.sh attnbench|staticprof   # (issue 18; carry .dev/mini) bench/decode_attention_bench.py,
#                                         # bench/decode_profile.py --static at Llama-3-8B width
#   OUT=$OUT bench/gpu_session.sh parity|klbench|train|graphcheck   # single-GPU runs (bench/gpu_parity.py,
#                                   # bench/kl.py, runs/smollm2_gpu_bench.yaml, bench/graph_decode_check.py)
#   [CONTEXTS=4096,...] [BATCHES=1,4,16] [GRAPHS=1 [COMPILE=1]] [FUSE=1] OUT=$OUT \
#       bench/gpu_session.sh infer small|8b [noprofile]
#       # (GRAPHS=1: also the CUDA-graph rows, issue 18; COMPILE=1: and the torch.compile'd step's rows, as for
#       # staticprof and graphcheck) no parts needed: carry .dev/mini (37 MB: the bundle's
#       # wheels/ + einops, and tok/ = the SmolLM2 tokenizer files: `mkdir -p .dev/mini/tok && cp wheels/*.whl
#       # .dev/mini/ && cp ~/.cache/ds_hybrid/smollm2-135m-instruct-v2/tokenizer*.json .dev/mini/tok/`); bench-infer and
#       # bench/decode_profile.py on random-init models (speed does not depend on the weights; the image's triton
#       # runs fla's forward kernels): SmolLM2 shape (teacher, 1/4 hybrid, all-linear) or Llama-3-8B shape
#       # (teacher, 4-of-32 hybrid). ~4 minutes each on a fresh H200; two calls within the warm window.
#
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
OUT=${OUT:-/tmp/out}
carry_home_() {  # carry parts (an align folder for the next lease) ride along to $OUT, as many as the trip home
  # takes beside the results (at most 8 files and 64 MiB a call; kept under 60 MiB): 3 parts of 15 MiB while the
  # results are small. A part is sent once, known by its path, size and time (a later pack of another align on the
  # same machine writes parts of the same names: those are new); a call whose files did not come back leaves its
  # parts marked sent: `bench/gpu_session.sh sh 'rm -f /tmp/carry_out.sent'` sends them again
  local carry=${CAMPAIGN_CARRY_OUT:-/tmp/carry_out} room files f size id
  touch $carry.sent
  room=$(( 60 * 1048576 - $(du -cb "$OUT"/* 2>/dev/null | tail -n 1 | cut -f1) ))  # (3 MiB kept for a results
  # tarball that grows between this look and the call's end)
  files=$(ls "$OUT" | wc -l)
  for f in $(ls $carry/* 2>/dev/null); do
    id="$f $(stat -c '%s %Y' "$f")"
    [ -f "$OUT/$(basename "$f")" ] && continue  # (sent by this call's snapshot already)
    grep -qxF "$id" $carry.sent && continue
    size=$(stat -c %s "$f")
    [ "$size" -le "$room" ] && [ "$files" -lt 8 ] || break
    cp "$f" "$OUT/" && echo "$id" >> $carry.sent && echo "carried home: $(basename $f)"
    room=$(( room - size )); files=$(( files + 1 ))
  done
}
case "$1" in
  sh)  # an ad-hoc command after setup, in the campaigns' environment (gpu_env.sh: carried wheels and triton 3.7.1 on
       # PYTHONPATH, the embedded teacher's GGUF, caches) plus this tree: bench/gpu_session.sh sh 'python3 ...'
       # (a job meant to outlive the call needs `setsid nohup ... &` and its own copy of the tree, /tmp/new: a plain
       # `nohup ... &` died with the call on 2026-12-06, its log empty)
    export PYTHONPATH="$PWD:$PYTHONPATH"
    bash -c "$2"
    ;;
  gputests)  # after setup: the tests that need a GPU (tests/test_kernels.py's *_on_cuda, tests/test_graph_decode.py's
             # capture), kernels compiled: TRITON_INTERPRET=0 (the CPU tests' interpreter runs fla's kernels on host
             # copies, which graph capture refuses: 2026-12-07); the whole log to $OUT/gpu_tests.log, its tail here
    export PYTHONPATH="$PWD:$PYTHONPATH"
    log=${OUT:-/tmp/res}/gpu_tests.log
    mkdir -p "$(dirname "$log")"
    rc=0
    # GPUTESTS="tests/test_graph_decode.py -k cuda": a subset for a lease's last minutes (a run by hand without this
    # environment's PYTHONPATH found no fla: 2026-12-07)
    TRITON_INTERPRET=0 timeout "${GPUTESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider -rs \
      ${GPUTESTS:-tests/test_kernels.py tests/test_graph_decode.py} > "$log" 2>&1 || rc=$?
    tail -n 8 "$log"
    exit $rc
    ;;
  part)
    mkdir -p /tmp/parts && cp ".dev/p$2"/* /tmp/parts/ && ls -la /tmp/parts | tail -n +4 | awk '{print $5, $9}'
    ;;
  gather)  # HERE, after a lease: gather FOLDER... (the calls' files_at folders) -> .dev/a0, .dev/a1, ... (2 parts each:
           # 3 and the working tree passed a call's 64 MiB on 2026-12-06; re-gathering .dev/a0.. in place regroups them;
           # APREFIX=.dev/s1a: another align's folders, e.g. a seed-1 align beside seed 0's)
    shift; py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python   # (here: the project's venv)
    $py bench/carry_export.py gather "$@" --name align --into "${APREFIX:-.dev/a}" --per-folder 2
    ;;
  apart)  # an align folder packed by an earlier lease (bench/carry_export.py parts, 2 per .dev/aN), for ALIGN_PARTS
          # (APREFIX as in gather; carry that folder)
    [ "$2" = 0 ] && rm -rf /tmp/carry_in   # (the first folder starts afresh: no part of another align mixes in)
    mkdir -p /tmp/carry_in && cp "${APREFIX:-.dev/a}$2"/* /tmp/carry_in/ && ls /tmp/carry_in
    ;;
  gpart)  # the Gemma-3-270M wheels (GEMMA=1 bench/make_bundle.sh), installed by setup when present
    mkdir -p /tmp/gparts && cp ".dev/g$2"/* /tmp/gparts/ && ls -la /tmp/gparts | tail -n +4 | awk '{print $5, $9}'
    ;;
  setup)
    t0=$SECONDS
    mkdir -p /tmp/g && cat /tmp/parts/part* | tar -xf - -C /tmp/g
    # the xz archives unpack on every core (xz -T0), beside the wheels' install; each one's failure stops the setup
    mkdir -p /tmp/tsite /tmp/dsh/corpus   # (DS_HYBRID_CACHE=/tmp/dsh)
    xz=(xz -T0); "${xz[@]}" --version >/dev/null 2>&1 || xz=(xz)   # (an xz older than 5.2 has no -T)
    # (each pipeline in a subshell: `wait` on a background pipeline gives only its last command's status)
    ( "${xz[@]}" -dc /tmp/g/triton.tar.xz | tar -xf - -C /tmp/tsite ) & un=($!)
    ( cat /tmp/g/corpus/corpus.tar.xz.* | "${xz[@]}" -dc | tar -xf - -C /tmp/dsh/corpus ) & un+=($!)
    if [ -f /tmp/g/corpus/pydocs.tar.xz ]; then  # the Python docs, as files
      ( "${xz[@]}" -dc /tmp/g/corpus/pydocs.tar.xz | tar -xf - -C / ) & un+=($!)
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/g/wheels/*.whl
    if [ -d /tmp/gparts ]; then
      mkdir -p /tmp/g/gemma && cat /tmp/gparts/gpart* | tar -xf - -C /tmp/g/gemma
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/g/gemma/*
    fi
    for p in "${un[@]}"; do wait "$p" || { echo "setup: unpacking an archive failed (job $p)" >&2; exit 1; }; done
    # AUTOTUNE_SEED=1: an earlier lease's Triton autotune choices (committed from its results' triton_autotune/, same
    # image and versions: the cache keys hash those) so that fla's kernels skip timing every config; never for a
    # lease that times `make demo` (a user's first run tunes them)
    if [ "${AUTOTUNE_SEED:-0}" = 1 ]; then
      if [ ! -d bench/triton_autotune_h200 ]; then
        echo "setup: AUTOTUNE_SEED=1 but no bench/triton_autotune_h200 (commit a lease's res/triton_autotune/ there)" >&2
        exit 1
      fi
      mkdir -p "$TRITON_CACHE_DIR" && cp -r bench/triton_autotune_h200/. "$TRITON_CACHE_DIR/"
      echo "setup: seeded $(find bench/triton_autotune_h200 -name '*.autotune.json' | wc -l) autotune results"
    fi
    echo "setup: joined, unpacked and installed in $(( SECONDS - t0 )) s"
    if [ -f /tmp/g/old.tar ]; then rm -rf /tmp/old && mkdir -p /tmp/old && tar -xf /tmp/g/old.tar -C /tmp/old; fi
    # the checkout is laid afresh at every call: background jobs run from a copy
    rm -rf /tmp/new && mkdir -p /tmp/new && tar --exclude=./.dev -cf - . | tar -xf - -C /tmp/new && cd /tmp/new
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || \
      echo "editable install failed: running from the checkout"
    python3 -c "import triton, torch, deepspeed, fla, transformers, lm_eval, nltk, wonderwords
from lm_eval.tasks.ruler import niah_utils  # what ds-hybrid eval imports: a missing one fails here, not at the end
print('triton', triton.__version__, 'torch', torch.__version__, 'ds', deepspeed.__version__, 'fla', fla.__version__,
      'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))
import ds_hybrid.kernels.fused_kl
from ds_hybrid.teacher import embedded_teacher_dir; print('teacher', embedded_teacher_dir())
from ds_hybrid.corpus import manifest; print('corpus sources', list(manifest()['sources']))"
    echo "setup: $(( SECONDS - t0 )) s in all"
    ;;
  start)
    # (an earlier campaign's CAMPAIGN_DONE on this machine would end every later wait at once)
    res=${CAMPAIGN_RES:-/tmp/res}
    if [ -s $res/campaign.pid ] && kill -0 -- -"$(cat $res/campaign.pid)" 2>/dev/null; then
      echo "a campaign is running on this machine already (pid $(cat $res/campaign.pid)): poll it with wait" >&2
      exit 1   # (a start repeated after a lost reply would put two campaigns on one GPU and one run folder)
    fi
    [ -d /tmp/new ] || { echo "start: no /tmp/new: run setup first" >&2; exit 1; }
    # this call's checkout over setup's copy (a fix made since setup runs; the editable install keeps pointing here)
    tar --exclude=./.dev -cf - . | tar -xf - -C /tmp/new
    mkdir -p $res && rm -f $res/CAMPAIGN_DONE && cd /tmp/new
    setsid nohup "${2:-bench/gpu_campaign.sh}" "${CAMPAIGN:-main}" > $res/campaign.log 2>&1 < /dev/null &
    echo $! > $res/campaign.pid
    sleep 2 && cat $res/progress.log 2>/dev/null || true
    ;;
  wait)
    # (CAMPAIGN_RES, CAMPAIGN_CARRY_OUT: other folders, for tests/test_gpu_session.py; the tarball is /tmp/res's)
    res=${CAMPAIGN_RES:-/tmp/res}
    if [ ! -f "$res/campaign.pid" ]; then  # a fresh machine: do not spend the lease's minutes waiting on nothing
      echo "wait: no campaign was started on this machine: the lease's machine was lost (or taken back) and this is"
      echo "a fresh one; what earlier polls brought home is all there is"
      exit 3
    fi
    end=$(( $(date +%s) + $2 )) pid=$(cat "$res/campaign.pid")
    # a snapshot first, with the carry parts that fit: a call cut off before its end (the lease's time spent, the
    # machine taken back) still brings home what was finished when it began
    bench/gpu_campaign.sh pack "$OUT" > /dev/null
    carry_home_
    while [ ! -f "$res/CAMPAIGN_DONE" ] && [ "$(date +%s)" -lt "$end" ]; do
      # alive while its process or any of its process group (its background jobs: `start` runs it under setsid) is
      kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null || {
        [ -f "$res/CAMPAIGN_DONE" ] || echo "wait: the campaign ended without CAMPAIGN_DONE (a step failed: see the"\
          "progress log and logs/)"
        break; }
      sleep ${WAIT_TICK_S:-10}
    done
    bench/gpu_campaign.sh pack "$OUT"
    carry_home_
    ls /tmp/res/tp 2>/dev/null | head -40 || true   # (no tp/: not a failure; with pipefail this line ended `wait`
    tail -n 60 /tmp/res/progress.log || true       #  with rc 2 before the progress tail until 2026-12-02)
    ;;
  parity)
    python3 bench/gpu_parity.py --out "$OUT/parity.json"
    ;;
  klbench)
    python3 bench/kl.py --out "$OUT/kl_bench.json"
    ;;
  graphcheck)  # issue 18, after setup: the embedded teacher and its stage-0 hybrid with 8 of 30 softmax layers (as
               # on 2026-12-02): greedy tokens with CUDA graphs == eager, and ms per decode step (docs/SERVING.md)
    T=/tmp/gcheck && mkdir -p $T "$OUT"
    python3 -m ds_hybrid.cli convert --overwrite --teacher /tmp/dsh/smollm2-135m-instruct-v2 --softmax-layers 0,3,7,11,15,18,22,26 \
      --dtype bf16 --device cuda --out $T/h
    comp=(); [ "${COMPILE:-0}" = 1 ] && comp=(--compile)   # COMPILE=1: also the torch.compile'd step
    python3 bench/graph_decode_check.py --model $T/h --teacher /tmp/dsh/smollm2-135m-instruct-v2 \
      --contexts "${CONTEXTS-4096,16384}" --batches "${BATCHES:-1,4}" "${comp[@]}" --out "$OUT/graph_decode_check.json"
    ;;
  attnbench)  # issue 18: decode attention over a static cache, per layer call (no parts needed: carry .dev/mini)
    [ -d /tmp/site/fla ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/mini/*.whl
    mkdir -p "$OUT" && PYTHONPATH="$PWD:$PYTHONPATH" python3 bench/decode_attention_bench.py --out "$OUT/decode_attention.json"
    ;;
  staticprof)  # issue 18: GraphDecoder's step at Llama-3-8B width, 4 layers (teacher; hybrid with layer 0 softmax),
              # CONTEXT (32768) x BATCH (4): ms per step with graphs and eagerly, and the GPU time per aten op (carry
              # .dev/mini; ~2 minutes)
    [ -d /tmp/site/fla ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/mini/*.whl
    T=/tmp/sprof && mkdir -p $T "$OUT" && export PYTHONPATH="$PWD:$PYTHONPATH"
    python3 -c "import json, sys; c = json.load(open('runs/configs/llama3_8b/config.json')); c['num_hidden_layers'] = 4
json.dump(c, open('$T/config.json', 'w'))"
    TOK=.dev/mini/tok; [ -d $TOK ] || TOK=/tmp/dsh/smollm2-135m-instruct-v2   # after a full setup: the teacher's
    python3 bench/random_teacher.py --config $T/config.json --tokenizer $TOK --out $T/l
    python3 -m ds_hybrid.cli convert --overwrite --teacher $T/l --softmax-layers 0 --dtype bf16 --device cuda --out $T/l_h
    comp=(); [ "${COMPILE:-0}" = 1 ] && comp=(--compile)   # COMPILE=1: also the torch.compile'd step
    python3 bench/decode_profile.py --model hybrid_1_of_4=$T/l_h --teacher $T/l --context ${CONTEXT:-32768} \
      --batch ${BATCH:-4} --steps 16 --static "${comp[@]}" --out "$OUT/static_profile.json"
    rm -rf $T
    ;;
  train)  # stage-kl throughput on the embedded teacher (docs/BENCHMARKS.md)
    for s in align kl; do
      python3 ds_hybrid/train.py --stage $s --config runs/smollm2_gpu_bench.yaml
      cp /tmp/gpu_bench/$s/metrics.jsonl "$OUT/${s}_metrics.jsonl"; cp /tmp/gpu_bench/$s/run_info.json "$OUT/${s}_run_info.json"
    done
    ;;
  infer)
    [ -d /tmp/site/fla ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/mini/*.whl
    T=/tmp/infer && mkdir -p $T "$OUT" && export PYTHONPATH="$PWD:$PYTHONPATH"   # no editable install here
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_$2.txt"
    prof=${3:-profile}   # "noprofile": bench-infer only (its GPU columns included), no bench/decode_profile.py
    graphs=(); [ "${GRAPHS:-0}" = 1 ] && graphs=(--cuda-graphs)   # GRAPHS=1: eager and CUDA-graph rows (issue 18)
    [ "${GRAPHS:-0}" = 1 ] && [ "${COMPILE:-0}" = 1 ] && graphs+=(--compile)  # COMPILE=1: and compiled-graph rows
    [ "${FUSE:-0}" = 1 ] && graphs+=(--fuse-projections)  # FUSE=1: the last mode again, hybrids' projections fused
    TOK=.dev/mini/tok; [ -d $TOK ] || TOK=/tmp/dsh/smollm2-135m-instruct-v2   # after a full setup: the teacher's
    if [ "$2" = small ]; then
      python3 bench/random_teacher.py --config runs/configs/smollm2_135m/config.json --tokenizer $TOK --out $T/s
      python3 -m ds_hybrid.cli convert --overwrite --teacher $T/s --ratio 0.25 --dtype bf16 --device cuda --out $T/s_h14
      python3 -m ds_hybrid.cli convert --overwrite --teacher $T/s --softmax-layers "" --dtype bf16 --device cuda --out $T/s_lin
      python3 -m ds_hybrid.cli bench-infer --overwrite --model hybrid_1_4=$T/s_h14 --model all_linear=$T/s_lin --teacher $T/s \
        --contexts ${CONTEXTS:-4096,16384,32768} --batches ${BATCHES:-1,8} --decode-tokens 64 "${graphs[@]}" \
        --out "$OUT/smollm2"
      [ "$prof" = noprofile ] || python3 bench/decode_profile.py --model hybrid_1_4=$T/s_h14 \
        --model all_linear=$T/s_lin --teacher $T/s --context 4096 --steps 32 --out "$OUT/smollm2/decode_profile.json"
    elif [ "$2" = gemma ]; then  # sliding-window layers as rings of the window (the default) against full-length
      # ones (DS_HYBRID_STATIC_RINGS=0), on a random Gemma-3-270M-shaped teacher (15 of 18 layers sliding, window
      # 512) and its stage-0 GDN hybrid keeping 5, 11 (global) and 12 (sliding); first the exactness check with
      # prompts of twice the window (GEMMA_CHECK=0 skips it: passed on an H200 on 2026-12-04e, ~7 minutes compiled)
      python3 bench/random_teacher.py --config runs/configs/gemma3_270m/config.json --tokenizer $TOK --out $T/g
      python3 -m ds_hybrid.cli convert --overwrite --teacher $T/g --softmax-layers 5,11,12 --dtype bf16 --device cuda --out $T/g_h
      [ "${GEMMA_CHECK:-1}" = 0 ] || python3 bench/graph_decode_check.py --model $T/g_h --teacher $T/g --prompt-len 1024 --contexts "" \
        $([ "${COMPILE:-0}" = 1 ] && echo --compile) --out "$OUT/gemma_graph_decode_check.json"
      for rings in 1 0; do
        DS_HYBRID_STATIC_RINGS=$rings python3 -m ds_hybrid.cli bench-infer --overwrite --model hybrid_3_of_18=$T/g_h \
          --teacher $T/g --contexts ${CONTEXTS:-8192,32768} --batches ${BATCHES:-1,8} --decode-tokens 32 \
          "${graphs[@]}" --out "$OUT/gemma3_rings$rings"
      done
    else
      python3 bench/random_teacher.py --config runs/configs/llama3_8b/config.json --tokenizer $TOK --out $T/l
      python3 -m ds_hybrid.cli convert --overwrite --teacher $T/l --ratio 0.125 --dtype bf16 --device cuda --out $T/l_h
      python3 -m ds_hybrid.cli bench-infer --overwrite --model hybrid_4_of_32=$T/l_h --teacher $T/l \
        --contexts ${CONTEXTS:-4096,16384,32768} --batches ${BATCHES:-1,4} --decode-tokens 32 "${graphs[@]}" \
        --out "$OUT/llama3_8b"
      [ "$prof" = noprofile ] || python3 bench/decode_profile.py --model hybrid_4_of_32=$T/l_h --teacher $T/l \
        --context 16384 --steps 16 --out "$OUT/llama3_8b/decode_profile.json"
    fi
    rm -rf $T   # the 8B pair is 34 GB of a 64 GB disk: a campaign may follow in the same lease
    ;;
  *) echo "unknown step $1"; exit 2 ;;
esac
