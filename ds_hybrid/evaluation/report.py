"""Results of `ds-hybrid eval` / `bench-infer`: one JSON, one markdown table, one PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ds_hybrid.folders import atomic_write_text


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion p measured on n prompts (scores in [0, 1] taken as successes)."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval holds p (at p = 1 the rounding of centre + half would put the upper end just under it)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def difference_interval(p1: float, n1: int, p2: float, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """p1 - p2 with its 95 % interval for two independent proportions (Newcombe 1998, method 10: from each
    proportion's Wilson interval) -> (difference, low, high). Scores of one prompt set taken as independent: wider
    than the paired interval (paired_difference_interval) where two models tend to get the same prompts right (90 %
    of the hybrid pairs' cells of docs/RESULTS.md's comparison), a little narrower where they tend not to."""
    l1, u1 = wilson_interval(p1, n1, z)
    l2, u2 = wilson_interval(p2, n2, z)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def paired_difference_interval(both: int, first_only: int, second_only: int, neither: int,
                               z: float = 1.96) -> tuple[float, float, float]:
    """p1 - p2 of two 0/1 scores of the same prompts, from the 2 x 2 table of their per-prompt outcomes (prompts both
    models got right, only the first, only the second, neither), with its 95 % interval (Newcombe 1998b, "Improved
    confidence intervals for the difference between binomial proportions based on paired data", method 10: each
    proportion's Wilson interval, combined with the outcomes' correlation phi, whose numerator ad - bc is taken as
    0 up to n / 2 and less n / 2 above it) -> (difference, low, high). Where two models tend to get the same prompts
    right (phi > 0) it is narrower than difference_interval, which takes the two sets of answers as independent."""
    a, b, c, d = both, first_only, second_only, neither
    n = a + b + c + d
    if n == 0:
        raise ValueError("paired_difference_interval: no prompts")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(p1, n, z)
    l2, u2 = wilson_interval(p2, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    num = a * d - b * c
    num = num - n / 2 if num > n / 2 else min(num, 0)
    phi = num / math.sqrt(den) if den else 0.0
    diff = p1 - p2
    low = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    high = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return diff, max(-1.0, diff - math.sqrt(max(low, 0.0))), min(1.0, diff + math.sqrt(max(high, 0.0)))


def intervals(scores: dict[str, dict[str, dict[str, float]]],
              counts: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{model: {task: {metric: [low, high]}}} for every score whose prompt count is known."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for model, tasks in scores.items():
        for task, row in tasks.items():
            for metric, v in row.items():
                n = counts.get(model, {}).get(task, {}).get(metric, 0)
                if n and v is not None and v >= 0:
                    out.setdefault(model, {}).setdefault(task, {})[metric] = list(wilson_interval(v, n))
    return out


def score_cell(v: float | None, n: int, digits: int = 3, show_n: bool = True) -> str:
    """A table cell: the score, and with its prompt count n > 0 its 95 % Wilson interval; "" for no score."""
    if v is None or v < 0:
        return ""
    if not n:
        return f"{v:.{digits}f}"
    lo, hi = wilson_interval(v, n)
    return f"{v:.{digits}f} [{lo:.2f}, {hi:.2f}]" + (f" n={n}" if show_n else "")


def recall_table(scores: dict[str, dict[str, dict[str, float]]], quality: dict[str, dict] | None = None,
                 counts: dict[str, dict[str, dict[str, int]]] | None = None) -> str:
    """scores: {model: {task: {length|'contains': score}}} -> markdown with models side by side; with ``counts``
    (prompts per score) each cell also shows n and its 95 % Wilson interval."""
    models = list(scores)
    rows = sorted({(t, m) for s in scores.values() for t, d in s.items() for m in d},
                  key=lambda x: (x[0], int(x[1]) if x[1].isdigit() else 10**9))
    lines = ["| task | length | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task, metric in rows:
        cells = []
        for m in models:
            n = (counts or {}).get(m, {}).get(task, {}).get(metric, 0)
            cells.append(score_cell(scores[m].get(task, {}).get(metric), n))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    if quality:
        for key in ("ppl", "kl_to_teacher"):
            if any(key in q for q in quality.values()):
                lines.append(f"| held-out {key} | | " + " | ".join(
                    f"{quality[m][key]:.3f}" if key in quality.get(m, {}) else "" for m in models) + " |")
    return "\n".join(lines)


def speed_table(rows: list[dict]) -> str:
    """Rows of bench-infer side by side. The GPU columns (decode kernel time per step and the tokens/s it allows)
    are filled on CUDA only; wall-clock decode tokens/s of eager decoding is host-bound there (speed.py)."""
    lines = ["| model | context | batch | prefill tok/s | decode tok/s | decode GPU ms/step | GPU-bound decode tok/s "
             "| cache GiB | peak GiB | GB a step | GB/s reached |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['context']} | {r['batch']} | {r['error']} | | | | | | | |")
            continue
        moved = (f"{r['decode_step_gb']:.3f} | {r['decode_gb_per_s']:.0f}" if "decode_step_gb" in r else "- | -")
        gpu = r.get("decode_gpu_ms_per_step")
        gpu_cells = f"{gpu:.2f} | {r['decode_gpu_bound_tokens_per_s']:.0f}" if gpu is not None else "- | -"
        lines.append(f"| {r['model']} | {r['context']} | {r['batch']} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {gpu_cells} | {r['cache_gib']:.4f} | "
                     f"{r.get('peak_gib', float('nan')):.2f} | {moved} |")
    return "\n".join(lines)


def plot_recall(scores: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Mean RULER/NIAH score over tasks vs context length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for model, per_task in scores.items():
        by_len: dict[int, list[float]] = {}
        for d in per_task.values():
            for k, v in d.items():
                if k.isdigit() and v >= 0:
                    by_len.setdefault(int(k), []).append(v)
        if by_len:
            xs = sorted(by_len)
            ax.plot(xs, [sum(by_len[x]) / len(by_len[x]) for x in xs], marker="o", label=model)
    ax.set(xlabel="context length (tokens)", ylabel="mean score over tasks", ylim=(-0.02, 1.02), title="recall vs length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speed(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(r["batch"] for r in rows)  # the largest batch: where the cache matters most
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    fig.suptitle(f"batch {batch}", fontsize=9)
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model and "error" not in r and r["batch"] == batch]
        xs = [r["context"] for r in rs]
        line, = axes[0].plot(xs, [r["decode_tokens_per_s"] for r in rs], marker="o", label=f"{model} (wall)")
        if all("decode_gpu_bound_tokens_per_s" in r for r in rs) and rs:
            axes[0].plot(xs, [r["decode_gpu_bound_tokens_per_s"] for r in rs], marker="s", ls="--",
                         color=line.get_color(), label=f"{model} (GPU-bound)")
        axes[1].plot(xs, [r["cache_gib"] for r in rs], marker="o", label=model)
    axes[0].set(xlabel="context", ylabel="decode tokens/s", xscale="log", yscale="log")
    axes[1].set(xlabel="context", ylabel="cache GiB", xscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out_dir: Path, name: str, payload: dict[str, Any], markdown: str) -> None:
    """``<name>.json`` and ``<name>.md`` in ``out_dir``, each replaced whole (an interrupted write leaves the old one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.json", json.dumps(payload, indent=1, default=str))
    atomic_write_text(out_dir / f"{name}.md", markdown + "\n")
