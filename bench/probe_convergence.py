"""How long must GA-S2's probes be? From one finished GA-S2 run: the ranking a shorter probe would have given, against
the run's own selection.

With a constant learning rate and no warm-up (the paper's probe schedule), a probe's first s steps are exactly an
s-step probe, so its training KL over steps s-w+1..s ranks the layers as s-step probes scored by their training KL
(``select.score: train_window``) would have. Every probe sees the same batches, so the comparison is paired.

    python bench/probe_convergence.py runs/compare/select/ga_s2 [--window 4] [--out table.md]
    python bench/probe_convergence.py docs/data/ga_s2_h200_2026-12-02c/probes.jsonl \
        --selection docs/data/ga_s2_h200_2026-12-02c/selection.json [--halving 1,2,5,8,10]

``--halving FIRSTS``: what successive halving (``select.method: halving``, survivors retrained: a round's probes are
fresh ones of that round's length) would have chosen with a first round of each of these step counts, replayed on
the same curves: a round's s-step probe is the GA-S2 probe's first s steps, scored by its training KL over steps
s-w+1..s (w = min(window, s); halving itself scores each round by held-out KL), with stage select's rule for the
survivors (the better half, never fewer than the largest K) and their lengths (doubled, at most the probes').
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_hybrid.selection import halving_next, halving_order, kendall_tau, rank_layers, read_selection  # noqa: E402


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


def window_score(curve: list[float], steps: int, window: int) -> float:
    """The training KL of an s-step probe: the mean over its last min(window, s) steps."""
    w = min(window, steps)
    return sum(curve[steps - w:steps]) / w


def replay_halving(curves: dict[int, list[float]], first_steps: int, keep: int, window: int) -> dict:
    """Successive halving (survivors retrained) replayed on full-length probe curves: its rounds, its final ranking
    and its cost in probe steps (``retrain``: every round's probes from step 0; ``continue``: survivors resumed)."""
    max_steps = min(len(c) for c in curves.values())
    layers = sorted(curves)
    if layers != list(range(len(layers))):
        raise ValueError(f"the curves cover layers {layers}: halving needs every layer 0..{len(layers) - 1}")
    alive, steps, prev, rounds = layers, max(1, min(first_steps, max_steps)), 0, []
    cost = {"retrain": 0, "continue": 0}
    while True:
        scores = {l: window_score(curves[l], steps, window) for l in alive}
        rounds.append({"steps": steps, "alive": alive, "scores": scores})
        cost["retrain"] += len(alive) * steps
        cost["continue"] += len(alive) * (steps - prev)
        nxt = halving_next(alive, scores, steps, max_steps, keep)
        if nxt is None:
            break
        alive, prev, steps = nxt[0], steps, nxt[1]
    return {"rounds": rounds, "ranking": rank_layers(halving_order(rounds, len(layers)), lower_is_better=True),
            "probe_steps": cost}


def halving_table(curves: dict[int, list[float]], reference: list[int], ks: list[int], window: int,
                  firsts: list[int], steps_tokens: int) -> str:
    """One row per first-round length: the rounds, the cost against GA-S2's (every layer's probe and the all-linear
    one at full length), the top-K sets and their overlap with the reference."""
    full = (len(curves) + 1) * min(len(c) for c in curves.values())
    lines = ["| first round | rounds (steps x probes) | probe steps: retrain / continue (of GA-S2's) | "
             + " | ".join(f"top-{k} (overlap)" for k in ks) + " | Kendall tau |",
             "|---|---|---|" + "---|" * len(ks) + "---|"]
    steps = min(len(c) for c in curves.values())
    for f in sorted({min(f, steps) for f in firsts}):  # (a first round past the probes' length is the whole probe)
        h = replay_halving(curves, f, max(ks), window)
        rounds = ", ".join(f"{r['steps']} x {len(r['alive'])}" for r in h["rounds"])
        cost = h["probe_steps"]
        tops = " | ".join(f"{sorted(h['ranking'][:k])} ({len(set(h['ranking'][:k]) & set(reference[:k]))}/{k})"
                          for k in ks)
        lines.append(f"| {f} step{'s' * (f != 1)} ({f * steps_tokens / 1e6:.2f}M) | {rounds} | {cost['retrain']} / "
                     f"{cost['continue']} ({cost['retrain'] / full:.0%} / {cost['continue'] / full:.0%}) | {tops} | "
                     f"{kendall_tau(h['ranking'], reference):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a GA-S2 selection folder (select/ga_s2) or a probes.jsonl summary")
    ap.add_argument("--selection", help="the reference selection.json (default: SRC/selection.json)")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--window", type=int, default=4, help="training steps averaged per score")
    ap.add_argument("--out", help="also write the table here (markdown)")
    ap.add_argument("--halving", help="comma-separated first-round step counts: replay successive halving instead")
    a = ap.parse_args()
    src = Path(a.src)
    sel = read_selection(a.selection or src / "selection.json", "--selection")
    ks = [int(k) for k in a.ks.split(",")]
    steps_tokens = sel["budget"]["global_batch"] * sel["budget"]["seq_len"]
    if a.halving is not None:
        try:
            firsts = [int(f) for f in a.halving.split(",")]
        except ValueError:
            firsts = []
        if not firsts or min(firsts) < 1:
            ap.error(f"--halving {a.halving!r}: comma-separated first-round step counts >= 1, e.g. 2,5,10")
        md = halving_table(train_curves(src), sel["ranking"], ks, a.window, firsts, steps_tokens)
        print(md)
        if a.out:
            Path(a.out).write_text(md + "\n")
        return
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
