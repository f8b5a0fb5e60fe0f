"""Ranking table and chart of GA-S2's single-layer probes from their run folders, including a selection that did not
finish (a lease that ended mid-probe): probes.jsonl, probes.md and probes.png in OUT.

    python bench/probes_table.py RUN/select/ga_s2/probes OUT --layers 18 --global-layers 5,11,17 --title "..."
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("probes", type=Path)
ap.add_argument("out", type=Path)
ap.add_argument("--layers", type=int, required=True, help="the teacher's layer count")
ap.add_argument("--global-layers", default="", help="comma-separated global layers of a sliding/global teacher")
ap.add_argument("--title", default="GA-S2 single-layer probes")
args = ap.parse_args()
src, out, L = args.probes, args.out, args.layers
out.mkdir(parents=True, exist_ok=True)
GLOBAL = {int(x) for x in args.global_layers.split(",") if x}
rows = []
for d in sorted(p for p in src.iterdir() if (p / "kl" / "DONE").is_file()):  # finished probes only
    m = [json.loads(line) for line in (d / "kl/metrics.jsonl").read_text().splitlines()]
    vals = [r for r in m if r.get("split") == "val"]
    train = [r for r in m if r.get("split") == "train"]
    info = json.loads((d / "kl/run_info.json").read_text())
    if not vals or len(info["softmax_layers"]) > 1:  # no held-out score, or not a single-layer probe
        continue
    val = vals[-1]
    rows.append(dict(probe=d.name, softmax_layers=info["softmax_layers"], steps=val["step"],
                     tokens=train[-1]["tokens"] if train else None,
                     val={k: val.get(k) for k in ("ce", "ppl", "kl", "recall_nll", "recall_kl")},
                     peak_gpu_gib=max((r.get("peak_gpu_gib", 0) for r in train), default=None),
                     tokens_per_s=train[-1].get("tokens_per_s") if train else None))
with open(out / "probes.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
base = next((r["val"] for r in rows if r["probe"] == "baseline"), None)
if base is None:
    raise SystemExit(f"{src}: no finished all-linear probe (baseline/kl/DONE): the ranking needs it")
layers = sorted((r for r in rows if r["softmax_layers"]), key=lambda r: r["val"]["kl"])
kind = (lambda x: "global" if x in GLOBAL else "sliding") if GLOBAL else (lambda x: "")


def fmt(v: float | None, spec: str) -> str:  # recall scores are absent where the probes recorded none
    return "-" if v is None else format(v, spec)


lines = ["| rank | layer | kind | held-out KL | vs all-linear | recall_kl | ce |", "|---|---|---|---|---|---|---|"]
for i, r in enumerate(layers, 1):
    layer = r["softmax_layers"][0]
    lines.append(f"| {i} | {layer} | {kind(layer)} | {r['val']['kl']:.3f} | "
                 f"{r['val']['kl'] - base['kl']:+.3f} | {fmt(r['val']['recall_kl'], '.2f')} | {r['val']['ce']:.3f} |")
measured = {r["softmax_layers"][0] for r in layers}
for x in range(L):
    if x not in measured:
        lines.append(f"| - | {x} | {kind(x)} | not measured (no finished probe) | | | |")
lines.append(f"| - | none (all-linear) | | {base['kl']:.3f} | 0 | {fmt(base['recall_kl'], '.2f')} | {base['ce']:.3f} |")
(out / "probes.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
panels = [("kl", "held-out KL after the probe")]
if base["recall_kl"] is not None and all(r["val"]["recall_kl"] is not None for r in layers):
    panels.append(("recall_kl", "recall KL after the probe"))
fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
for ax, (key, title) in zip(axes[0], panels):
    xs = list(range(L))
    by = {r["softmax_layers"][0]: r["val"][key] for r in layers}
    vals = [by.get(x, 0) for x in xs]
    ax.bar(xs, vals, color=["tab:red" if x in GLOBAL else "tab:blue" for x in xs])
    ax.axhline(base[key], color="k", ls="--", lw=1, label="all-linear")
    for x in xs:
        if x not in by:
            ax.text(x, base[key] * 0.05, "n/a", ha="center", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xlabel("layer kept softmax" + (" (red: global, blue: sliding window)" if GLOBAL else ""))
    ax.set_title(title + " (lower is better)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
fig.suptitle(args.title, fontsize=10)
fig.tight_layout()
fig.savefig(out / "probes.png", dpi=110)
