#!/usr/bin/env bash
# Steps of a GPU session on a lent machine with no network (see docs/BENCHMARKS.md for what came out).
# Wheels travel in .whl/, triton 3.7.1 (needed for fla's GDN backward on Hopper) and the SmolLM2 GGUF in parts.
#
#   bench/gpu_session.sh stash DIR        # copy a carried folder's parts to /tmp/g (first call also installs wheels)
#   bench/gpu_session.sh triton           # join the triton parts, install into /tmp/tsite
#   bench/gpu_session.sh parity|klbench|train|cache
set -euo pipefail
cd "$(dirname "$0")/.."
G=/tmp/g
mkdir -p $G
export PYTHONPATH=/tmp/tsite:/tmp/site
export DS_HYBRID_CACHE=/tmp/dsh TRITON_CACHE_DIR=/tmp/tcache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DS_HYBRID_SMOLLM2_GGUF=$G/SmolLM2-135M-Instruct.Q4_1.gguf TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
# ds-hybrid itself, editable (kernels/ is mapped to ds_hybrid.kernels by the install)
python3 -c "import ds_hybrid.kernels" 2>/dev/null || \
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
case "$1" in
  stash)
    cp "$2"/* $G/
    if [ -d .whl ] && [ ! -d /tmp/site ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    fi
    if [ -f $G/corpus.tar.xz ] && [ ! -d $G/corpus ]; then mkdir -p $G/corpus && tar -xJf $G/corpus.tar.xz -C $G/corpus; fi
    if [ -f $G/gguf.part1 ] && [ ! -f $DS_HYBRID_SMOLLM2_GGUF ]; then cat $G/gguf.part0 $G/gguf.part1 > $DS_HYBRID_SMOLLM2_GGUF; fi
    ls -la $G | tail -n +2 | awk '{print $5, $9}'
    ;;
  triton)
    cat $G/tri.part0 $G/tri.part1 $G/tri.part2 $G/tri.part3 > $G/triton-3.7.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tsite \
      $G/triton-3.7.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
    python3 -c "import triton, torch, deepspeed, fla; print('triton', triton.__version__, 'torch', torch.__version__, 'ds', deepspeed.__version__, 'fla', fla.__version__)"
    ;;
  parity)
    python3 bench/gpu_parity.py --out $OUT/parity.json
    ;;
  klbench)
    python3 bench/kl.py --out $OUT/kl_bench.json
    ;;
  train)
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 ds_hybrid/train.py --stage align --config runs/smollm2_gpu_bench.yaml data.source=$G/corpus
    python3 ds_hybrid/train.py --stage kl --config runs/smollm2_gpu_bench.yaml data.source=$G/corpus
    cp /tmp/gpu_bench/*/metrics.jsonl $OUT/ 2>/dev/null || true
    for s in align kl; do cp /tmp/gpu_bench/$s/metrics.jsonl $OUT/${s}_metrics.jsonl; cp /tmp/gpu_bench/$s/run_info.json $OUT/${s}_run_info.json; done
    ;;
  cache)
    tar -czf $OUT/triton_cache.tar.gz -C /tmp tcache && ls -la $OUT
    ;;
  *) echo "unknown step $1"; exit 2 ;;
esac
