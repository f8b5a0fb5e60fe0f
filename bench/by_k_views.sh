#!/usr/bin/env bash
# The paper's comparison (docs/RESULTS.md section 2): rebuild the merged table's three selector x K views (by_k, by_k_strict,
# by_k_paired) after `bench/import_lease.py ... --merge docs/data/compare_smollm2_merged`. A hybrid is placed under a
# selector when its layers equal that selection's top-K (`ds-hybrid recall-vs-k`); a hybrid no selection below names
# is listed under its own name and left out of every difference table, so a new selector's hybrid needs its
# selection.json here first. The seed-0 align's selections (GA-S2's, the proxy's, ppl's, mse's, ar's, ar_multihop's,
# the regularized GA-S2's) and the teacher-only retrieval; `proxy_s1`: the seed-1 align's proxy, whose top-8 is the
# seed-0 one's and whose top-4 takes 17 for 2 (docs/SELECT.md). uniform and smart are rules, not files.
#   bench/by_k_views.sh [MERGED]      (default docs/data/compare_smollm2_merged)
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-docs/data/compare_smollm2_merged}
D=docs/data
SEL=(
  --selection ga_s2=$D/ga_s2_h200_2026-12-02c/selection.json
  --selection ga_s2_reg0.3=$D/ga_s2_h200_2026-12-02c/distance_reg/ga_s2_reg0.3/selection.json
  --selection proxy=$D/compare_ga_s2_8_h200_2026-12-02d/selectors/proxy/selection.json
  --selection proxy_s1=$D/selectors_seed1_align_h100_2026-12-06g/selectors/proxy/selection.json
  --selection ppl=$D/compare_ga_s2_8_h200_2026-12-02d/selectors/ppl/selection.json
  --selection mse=$D/compare_ga_s2_8_h200_2026-12-02d/selectors/mse/selection.json
  --selection ar=$D/compare_ga_s2_reg03_8_h200_2026-12-04d/selectors/ar/selection.json
  --selection ar_multihop=$D/compare_ga_s2_reg03_8_h200_2026-12-04d/selectors/ar_multihop/selection.json
  --selection retrieval=$D/retrieval_selection_smollm2_cpu_2026-12-03/selection.json
)
# named pairs the selector tables do not hold (docs/RESULTS.md section 2 quotes their counts): two seeds of one recipe
# (seed 1 minus seed 0; GA-S2 K = 4's, uniform K = 8's and GA-S2 K = 8's seed 0 from before/after the RoPE fix as named),
# hybrids of two K, and the two ablation selectors at one K (ar_multihop against ar)
PAIRS=(
  uniform8_s1:uniform8_rope ga_s2_8_s1:ga_s2_8_rope ga_s2_4_s1:ga_s2_4 retrieval_4_s1:retrieval_4
  uniform4_s1:uniform_4 proxy_4_s1:proxy_4
  ga_s2_4_s1:uniform8_s1 ga_s2_4:uniform8_rope smart_8_s1:smart_4_s1 mse_8_s1:mse_4_s1 ar_8_s1:ar_4_s1
  ar_multihop_8_s1:ar_multihop_4_s1 ar_multihop_8_s1:ar_8_s1 ar_multihop_4_s1:ar_4_s1
)
PAIR_ARGS=()
for p in "${PAIRS[@]}"; do PAIR_ARGS+=(--pair "$p"); done
DSH=${DSH:-ds-hybrid}
for view in "" strict paired; do
  $DSH recall-vs-k "$M/eval.json" "${SEL[@]}" --against uniform,ga_s2 "${PAIR_ARGS[@]}" ${view:+--$view} \
    --out "$M/by_k${view:+_$view}"
done
