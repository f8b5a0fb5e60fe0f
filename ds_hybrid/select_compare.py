"""``ds-hybrid select-compare``: how far two or more layer selections agree.

    ds-hybrid select-compare gdn=out/gdn/select/ga_s2/selection.json gla=out/gla/select/ga_s2/selection.json \
        --ks 4,8 --out outputs/compare

For every pair: the top-K overlap at each K (|top-K(A) & top-K(B)| / K) and Kendall's tau between the two rankings
(1 = same order, -1 = reversed); written as compare.md / compare.json, with compare.png: each selection's rank of
every layer (rank 1 = most important), the layers of the largest K marked. Any selection.json compares with any
other of the same teacher depth: two mixers (GDN vs GLA), two seeds, two probe budgets, a method against GA-S2,
a distance-regularized selection against plain GA-S2.

``--distance-reg 0.1,0.3`` adds each score-based selection re-ranked from its own scores with ``select.distance_reg``
at each lambda (the ranking stage select writes for that lambda, without its probes: for a selection.json brought
back from a cluster), compared beside the others and written to ``--out/<name>_reg<lambda>/selection.json``, usable
as ``softmax_layers.selection``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from ds_hybrid.config import HALVING_NO_REG, SPACING_METHODS
from ds_hybrid.errors import ConfigError
from ds_hybrid.layers import chosen_sets, selection_top_k
from ds_hybrid.selection import make_selection, ranking_tau, read_selection, write_selection

#: what a re-ranked selection keeps of its source's record (the probes' provenance; the ranking and choices are new)
PROVENANCE = ("teacher", "align", "budget", "probes", "tokens_spent", "baseline", "layer_types", "settings",
              "config_hash")


def load_named(items: list[str], at_least: int = 2) -> dict[str, dict]:
    """['name=path' or 'path', ...] -> {name: selection}; every selection must rank the same number of layers."""
    out: dict[str, dict] = {}
    for item in items:
        name, path = item.split("=", 1) if "=" in item and not Path(item).exists() else (None, item)
        sel = read_selection(path, "select-compare")
        name = name or f"{Path(path).parent.name}:{sel['method']}"
        while name in out:
            name += "'"
        out[name] = sel
    sizes = {s["num_layers"] for s in out.values()}
    if len(sizes) > 1:
        raise ConfigError("select-compare", items, f"the selections rank different numbers of layers ({sorted(sizes)})")
    if len(out) < at_least:
        raise ConfigError("select-compare", items,
                          "give at least two selection.json files (or one with --distance-reg)")
    return out


def regularized(name: str, sel: dict, distance_reg: float, ks: list[int]) -> dict:
    """``sel`` re-ranked from its own scores with ``select.distance_reg = distance_reg``."""
    scores = sel.get("scores") or {}
    if sel["method"] in SPACING_METHODS or len(scores) != sel["num_layers"]:
        raise ConfigError("--distance-reg", distance_reg, f"{name} ({sel['method']}) has no score for every layer: "
                          "the regularizer re-ranks scores (uniform, smart and keep_global are spacing rules)")
    if sel["method"] == "halving":  # (stage select refuses the same: config.validate_static)
        raise ConfigError("--distance-reg", distance_reg, f"{name} is a halving selection: {HALVING_NO_REG}")
    out = make_selection(sel["method"], {int(l): v for l, v in scores.items()}, sel["lower_is_better"],
                         sel["num_layers"], distance_reg=distance_reg, derived_from=name,
                         **{k: sel[k] for k in PROVENANCE if k in sel})
    out["chosen"] = chosen_sets(out["ranking"], sel["num_layers"], ks)
    return out


def chosen_overlap(a: dict, b: dict, k: int) -> float:
    """|the K layers a keeps & the K layers b keeps| / K (for the spacing rules: the rule's layers at K, which are not
    a prefix of their order)."""
    return len(set(selection_top_k(a, k)) & set(selection_top_k(b, k))) / k if k else 1.0


def compare(selections: dict[str, dict], ks: list[int]) -> list[dict]:
    rows = []
    for (a, sa), (b, sb) in itertools.combinations(selections.items(), 2):
        tau = ranking_tau(sa, sb)
        row = {"a": a, "b": b, "kendall_tau": None if tau is None else round(tau, 4)}
        for k in ks:
            row[f"top{k}"] = round(chosen_overlap(sa, sb, k), 4)
            row[f"top{k}_layers"] = {"a": selection_top_k(sa, k), "b": selection_top_k(sb, k)}
        rows.append(row)
    return rows


def table(rows: list[dict], ks: list[int], selections: dict[str, dict]) -> str:
    head = "| A | B | " + " | ".join(f"top-{k} overlap" for k in ks) + " | Kendall tau |"
    lines = [head, "|---|---|" + "---|" * (len(ks) + 1)]
    for r in rows:
        cells = " | ".join(f"{r[f'top{k}']:.2f} ({round(r[f'top{k}'] * k)}/{k})" for k in ks)
        tau = "n/a (a spacing rule)" if r["kendall_tau"] is None else f"{r['kendall_tau']:.3f}"
        lines.append(f"| {r['a']} | {r['b']} | {cells} | {tau} |")
    lines += ["", "| selection | method | " + " | ".join(f"top-{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for name, sel in selections.items():
        method = sel["method"] + (f", distance_reg {sel['distance_reg']:g}" if sel.get("distance_reg") else "")
        lines.append(f"| {name} | {method} | " + " | ".join(str(selection_top_k(sel, k)) for k in ks) + " |")
    return "\n".join(lines)


def plot(selections: dict[str, dict], k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = next(iter(selections.values()))["num_layers"]
    fig, ax = plt.subplots(figsize=(max(6, L * 0.25), 3.6))
    for i, (name, sel) in enumerate(selections.items()):
        rank = {l: r + 1 for r, l in enumerate(sel["ranking"])}
        ys = [rank[l] for l in range(L)]
        ax.plot(range(L), ys, marker="o", ms=3, lw=1, color=f"C{i}", label=name)
        top = selection_top_k(sel, k)
        ax.scatter(top, [rank[l] for l in top], s=60, facecolors="none", edgecolors=f"C{i}")
    ax.invert_yaxis()
    ax.set_xlabel("layer")
    ax.set_ylabel("rank (1 = most important)")
    ax.set_title(f"layer rankings; circles: top-{k}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hybrid select-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("selections", nargs="+", help="selection.json files, or name=path")
    ap.add_argument("--ks", default="4,8", help="comma-separated K values")
    ap.add_argument("--out", default=None, help="folder for compare.md, compare.json and compare.png")
    ap.add_argument("--distance-reg", default="", help="comma-separated lambdas: each selection re-ranked from its "
                    "scores with select.distance_reg = lambda too (written to --out/<name>_reg<lambda>/)")
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",") if k]
    except ValueError:
        raise ConfigError("--ks", args.ks, "comma-separated integers, e.g. 4,8") from None
    try:
        lambdas = [float(x) for x in args.distance_reg.split(",") if x]
    except ValueError:
        raise ConfigError("--distance-reg", args.distance_reg,
                          "comma-separated penalty weights, e.g. 0.1,0.3") from None
    if any(lam <= 0 for lam in lambdas):
        raise ConfigError("--distance-reg", args.distance_reg, "penalty weights > 0 (0 is the selection itself)")
    sels = load_named(args.selections, at_least=1 if lambdas else 2)
    for name, sel in list(sels.items()):
        for lam in lambdas:
            sels[f"{name}_reg{lam:g}"] = regularized(name, sel, lam, ks)
    L = next(iter(sels.values()))["num_layers"]
    bad = [k for k in ks if not 1 <= k <= L]
    if bad:
        raise ConfigError("--ks", args.ks, f"K must lie in 1..{L}")
    rows = compare(sels, ks)
    md = table(rows, ks, sels)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md + "\n")
        (out / "compare.json").write_text(json.dumps({"ks": ks, "pairs": rows,
                                                      "rankings": {n: s["ranking"] for n, s in sels.items()}},
                                                     indent=1))
        plot(sels, max(ks), out / "compare.png")
        for name, sel in sels.items():
            if "derived_from" in sel:
                write_selection(out / name.replace(":", "_").replace("/", "_") / "selection.json", sel)
    return 0
