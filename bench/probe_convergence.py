"""How long must GA-S2's probes be? From one finished GA-S2 run: the ranking a shorter probe would have given, against
the run's own selection.

With a constant learning rate and no warm-up (the paper's probe schedule), a probe's first s steps are exactly an
s-step probe, so its training KL over steps s-w+1..s ranks the layers as s-step probes scored by their training KL
(``select.score: train_window``) would have. Every probe sees the same batches, so the comparison is paired.

    python bench/probe_convergence.py runs/compare/select/ga_s2 [--window 4] [--out table.md]
    python bench/probe_convergence.py docs/data/ga_s2_h200_2026-12-02c/probes.jsonl \
        --selection docs/data/ga_s2_h200_2026-12-02c/selection.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_hybrid.selection import kendall_tau, rank_layers, read_selection  # noqa: E402


def train_curves(src: Path) -> dict[int, list[float]]:
    """{layer: training KL per step} from a GA-S2 folder's probes, or a probes.jsonl summary of them."""
    curves = {}
    if src.is_file():
        for line in src.read_text().splitlines():
            p = json.loads(line)
            if p["probe"] != "baseline":
                curves[p["softmax_layers"][0]] = p["train_kl"]
        return curves
    for done in sorted(src.glob("probes/layer_*/kl/DONE")):
        layer = json.loads(done.read_text())["softmax_layers"][0]
        rows = [json.loads(x) for x in (done.parent / "metrics.jsonl").read_text().splitlines()]
        curves[layer] = [r["kl"] for r in sorted(rows, key=lambda r: r["step"]) if r["split"] == "train"]
    return curves


def convergence(curves: dict[int, list[float]], reference: list[int], ks: list[int], window: int) -> list[dict]:
    steps = min(len(c) for c in curves.values())
    rows = []
    for s in sorted({*range(window, steps + 1, window), steps}):
        score = {l: sum(c[s - window:s]) / window for l, c in curves.items()}
        ranking = rank_layers(score, lower_is_better=True)
        rows.append({"steps": s, "kendall_tau": kendall_tau(ranking, reference),
                     **{f"top{k}": len(set(ranking[:k]) & set(reference[:k])) for k in ks},
                     "top_layers": sorted(ranking[:max(ks)])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a GA-S2 selection folder (select/ga_s2) or a probes.jsonl summary")
    ap.add_argument("--selection", help="the reference selection.json (default: SRC/selection.json)")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--window", type=int, default=4, help="training steps averaged per score")
    ap.add_argument("--out", help="also write the table here (markdown)")
    a = ap.parse_args()
    src = Path(a.src)
    sel = read_selection(a.selection or src / "selection.json", "--selection")
    ks = [int(k) for k in a.ks.split(",")]
    steps_tokens = sel["budget"]["global_batch"] * sel["budget"]["seq_len"]
    rows = convergence(train_curves(src), sel["ranking"], ks, a.window)
    lines = ["| probe steps | tokens per probe | Kendall tau vs the selection | " + " | ".join(f"top-{k}" for k in ks)
             + f" | top-{max(ks)} layers |", "|---|---|---|" + "---|" * (len(ks) + 1)]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['steps'] * steps_tokens / 1e6:.2f}M | {r['kendall_tau']:.3f} | "
                     + " | ".join(f"{r[f'top{k}']}/{k}" for k in ks) + f" | {r['top_layers']} |")
    md = "\n".join(lines)
    print(md)
    if a.out:
        Path(a.out).write_text(md + "\n")


if __name__ == "__main__":
    main()
