"""Which of the teacher's layers retrieve a needle: a per-layer retrieval score of the softmax teacher, set beside
the selections (does KL-guided selection keep the layers that copy from context?).

    python bench/retrieval_layers.py --teacher embedded --prompts 40 --length 2048 \
        --selection ga_s2=docs/data/ga_s2_h200_2026-12-02c/selection.json --out docs/data/retrieval_layers

Prompts: a key-value fact ("The access code of Bemo Zuta is 123456.") planted at a random depth of the local essay
haystack (the text RULER's essay tasks use here), a question about it at the end, and the answer after "is"
(`ds_hybrid.recall_tasks.needle_row`, the recall score of stage kl). The teacher reads each prompt once with eager
attention, the answer included (teacher-forced); at every position that predicts an answer token, each head's
attention row is compared with the needle: the head *copies* there when its largest weight falls on the needle's
token that the answer token repeats (the retrieval score of Wu et al., "Retrieval Head Mechanistically Explains
Long-Context Factuality", 2024), and its *needle mass* is the weight summed over the needle's value tokens.
A layer's score is its best head's: copy rate (the ranking), needle mass beside it. The teacher's own accuracy on
the answer tokens is reported too.

Writes retrieval_layers.json (per layer and head), retrieval_layers.md (the ranking and, for every --selection and
the uniform rule, the top-K overlap with the K best retrieval layers and Kendall tau) and retrieval_layers.png.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ds_hybrid.layers import selection_top_k, uniform_layers
from ds_hybrid.recall_tasks import needle_row
from ds_hybrid.retrieval_heads import copy_counts, needle_sources
from ds_hybrid.selection import kendall_tau, rank_layers, read_selection


def make_prompts(tokenizer, n: int, length: int, seed: int) -> list[tuple[list[int], int, int, list[int]]]:
    from ds_hybrid.evaluation.haystack import haystack_words

    words = haystack_words()
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        at = rng.randrange(0, max(1, len(words) - 4 * length))
        filler = tokenizer(" ".join(words[at:at + 2 * length]), add_special_tokens=False)["input_ids"][:length]
        ids, start, end = needle_row(filler, tokenizer, rng)
        src = needle_sources(ids, start, end)
        if src:
            out.append((ids, start, end, src))
    return out


def score(model, prompts) -> dict:
    """Per layer and head: copy rate and needle mass (ds_hybrid.retrieval_heads); the teacher's answer accuracy."""
    c = copy_counts(model, prompts)
    return {"copy_rate": c.copy_rate().tolist(), "needle_mass": (c.mass / max(c.positions, 1)).tolist(),
            "positions": c.positions, "teacher_answer_accuracy": c.correct / max(c.total, 1), "prompts": len(prompts)}


def report(res: dict, selections: dict[str, dict], ks: list[int]) -> tuple[str, list[int]]:
    copy = [max(h) for h in res["copy_rate"]]
    mass = [max(h) for h in res["needle_mass"]]
    L = len(copy)
    order = rank_layers({i: c for i, c in enumerate(copy)}, lower_is_better=False)
    lines = [f"{res['prompts']} prompts, {res['positions']} answer positions; the teacher's accuracy on the answer "
             f"tokens (teacher-forced): {res['teacher_answer_accuracy']:.3f}", "",
             "| rank | layer | copy rate (best head) | needle mass (best head) |", "|---|---|---|---|"]
    lines += [f"| {r + 1} | {l} | {copy[l]:.3f} | {mass[l]:.3f} |" for r, l in enumerate(order)]
    lines += ["", "| selection | K | its layers | overlap with the K best retrieval layers | Kendall tau (ranking) |",
              "|---|---|---|---|---|"]
    for k in ks:
        for name, sel in {"uniform": None, **selections}.items():
            chosen = uniform_layers(L, k) if sel is None else selection_top_k(sel, k)
            tau = "" if sel is None else f"{kendall_tau(order, sel['ranking']):.3f}"
            shared = len(set(order[:k]) & set(chosen))
            lines.append(f"| {name} | {k} | {sorted(chosen)} | {shared / k:.2f} ({shared}/{k}) | {tau} |")
    return "\n".join(lines) + "\n", order


def plot(res: dict, selections: dict[str, dict], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy = [max(h) for h in res["copy_rate"]]
    L = len(copy)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.bar(range(L), copy, color="0.6", label="copy rate of the layer's best head")
    marks = {"uniform": uniform_layers(L, k), **{n: selection_top_k(s, k) for n, s in selections.items()}}
    for j, (name, chosen) in enumerate(marks.items()):
        ax.scatter(chosen, [max(copy) * (1.06 + 0.07 * j)] * len(chosen), marker="v", label=f"{name} K = {k}")
    ax.set_xlabel("layer")
    ax.set_ylabel("copy rate")
    ax.set_xticks(range(L))
    ax.set_title(f"which layers copy the needle ({res['prompts']} prompts); markers: the layers each selection keeps")
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="embedded")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--length", type=int, default=2048, help="tokens of haystack per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--selection", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from ds_hybrid.teacher import load_teacher

    selections = {}
    for item in args.selection:
        name, eq, path = item.partition("=")
        if not eq or not name:
            ap.error(f"--selection {item}: write NAME=PATH (e.g. ga_s2=out/select/ga_s2/selection.json)")
        selections[name] = read_selection(path, "--selection")
    model, tok = load_teacher(args.teacher, attn_implementation="eager")
    res = score(model, make_prompts(tok, args.prompts, args.length, args.seed))
    res.update(teacher=args.teacher, length=args.length, seed=args.seed)
    ks = [int(k) for k in args.ks.split(",")]
    md, order = report(res, selections, ks)
    res["ranking"] = order
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_layers.json").write_text(json.dumps(res, indent=1))
    (out / "retrieval_layers.md").write_text(md)
    plot(res, selections, max(ks), out / "retrieval_layers.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
