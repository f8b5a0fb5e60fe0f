"""kl's recall probe against the hybrids' recall (docs/RESULTS.md section 2): each hybrid of a merged eval's end-of-kl
held-out `recall_kl` (the student's KL to the teacher on the answer tokens of planted facts, teacher-forced) and text
`kl`, beside its score on one task at one length, and Spearman's rho of each against that score (lower KL with higher
recall counts as agreement: rho of -KL).

    python bench/probe_vs_recall.py [docs/data/compare_smollm2_merged/eval.json] [--task niah_single_1] [--length 8192]

A hybrid's kl metrics are found beside the evaluation the merge read it from (its source's lease folder):
`<name>_kl_metrics.jsonl.gz`, or `kl_metrics.jsonl.gz` in a folder of one trained hybrid; hybrids whose kl logged no
recall probe (the first leases), or whose metrics are not found, are listed as such and left out of rho.
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from ds_hybrid.evaluation.by_k import source_file

ENDS = ("teacher", "all_linear")


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's r of the ranks (ties averaged); nan where either side is constant."""
    rx, ry = ranks(x), ranks(y)
    n = len(x)
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def last_val(path: Path) -> dict:
    """The last held-out row of a kl metrics file (.jsonl or .jsonl.gz); a torn last line is skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    last: dict = {}
    with opener(path, "rt") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("split") == "val":
                last = row
    return last


def metrics_file(folder: Path, name: str, hybrids: set[str]) -> Path | None:
    """A hybrid's kl metrics in its lease folder: its own file, or the folder's kl_metrics file where ``hybrids`` (the
    hybrids evaluated from that folder, by the lease's names) is this one alone."""
    own = folder / f"{name}_kl_metrics.jsonl.gz"
    if own.is_file():
        return own
    shared = folder / "kl_metrics.jsonl.gz"
    return shared if shared.is_file() and hybrids == {name} else None


def probe_rows(merged: Path, task: str, length: int) -> list[dict]:
    """Each hybrid of the merged eval with a score on ``task`` at ``length``: its score and its kl's last held-out
    recall_kl and kl (None where not logged or not found), sorted by recall_kl."""
    payload = json.loads(merged.read_text())
    found: dict[str, tuple[Path, str]] = {}  # merged name -> (its lease folder, its name there)
    in_folder: dict[Path, set[str]] = {}
    for src in payload.get("sources") or []:
        file = source_file(Path(src["file"]), merged)
        if file is None:
            continue
        folder = file.parent.parent  # (docs/data/LEASE/eval_NAME_PART/eval.json)
        old_name = {new: old for old, new in (src.get("renames") or {}).items()}
        for model in src.get("models") or []:
            if model not in ENDS:
                found.setdefault(model, (folder, old_name.get(model, model)))
                in_folder.setdefault(folder, set()).add(old_name.get(model, model))
    rows = []
    for model in payload["scores"]:
        score = payload["scores"][model].get(task, {}).get(str(length))
        if model in ENDS or score is None:
            continue
        folder, name = found.get(model, (None, model))
        path = None if folder is None else metrics_file(folder, name, in_folder[folder])
        val = {} if path is None else last_val(path)
        rows.append({"model": model, "score": score, "recall_kl": val.get("recall_kl"), "kl": val.get("kl"),
                     "metrics": None if path is None else str(path)})
    return sorted(rows, key=lambda r: (r["recall_kl"] is None, r["recall_kl"] or 0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("merged", nargs="?", type=Path, default=Path("docs/data/compare_smollm2_merged/eval.json"))
    ap.add_argument("--task", default="niah_single_1")
    ap.add_argument("--length", type=int, default=8192)
    args = ap.parse_args(argv)
    rows = probe_rows(args.merged, args.task, args.length)
    print(f"| hybrid | recall_kl (end of kl) | text KL (kl's held-out rows) | {args.task} at {args.length} |")
    print("|---|---|---|---|")
    for r in rows:
        probe = ("no kl metrics found" if r["metrics"] is None else "no probe logged" if r["recall_kl"] is None
                 else f"{r['recall_kl']:.3f}")
        text = "" if r["kl"] is None else f"{r['kl']:.3f}"
        print(f"| {r['model']} | {probe} | {text} | {r['score']:.2f} |")
    used = [r for r in rows if r["recall_kl"] is not None and r["kl"] is not None]
    if len(used) < 3:
        print(f"\n{len(used)} hybrids with a recall probe: too few for a rank correlation")
        return 1
    recall = [r["score"] for r in used]
    print(f"\n{len(used)} hybrids with a recall probe: Spearman's rho against {args.task} at {args.length}: "
          f"recall probe {spearman([-r['recall_kl'] for r in used], recall):.2f}, "
          f"text KL {spearman([-r['kl'] for r in used], recall):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
